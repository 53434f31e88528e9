//! The two output streams and what their failures mean.
//!
//! stdout carries the answer: a reader that closes the pipe early (`| head`) ends zagreus quietly
//! and successfully, any other write failure (`>/dev/full`) is an error, and a stdout that was
//! closed before zagreus started (`>&-`, which Rust's runtime silently replaces with `/dev/null`)
//! is refused up front instead of losing the answer.
//! stderr carries logs: a failure to write them (`2>/dev/full`) never stops or aborts the program
//! ([`note!`] instead of `eprintln!`, which panics).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Writes one line to stderr; a failure to write it is ignored (logs are not worth dying for).
#[macro_export]
macro_rules! note {
    () => {
        $crate::output::stderr_line(::std::format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::stderr_line(::std::format_args!($($arg)*))
    };
}

/// [`note!`]'s implementation.
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
    let _ = err.flush();
}

/// Whether an error (anywhere in its chain) is a closed pipe: the reader has what it wanted.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Whether descriptor 1 was open when the process started, recorded by
/// [`record_stdout_at_start`] before Rust's runtime replaces a closed one with `/dev/null`.
static STDOUT_OPEN_AT_START: AtomicBool = AtomicBool::new(true);

/// Records whether stdout is open. The binary runs it as a constructor (`.init_array`), before
/// Rust's runtime starts: afterwards a stdout closed with `>&-` cannot be told from a
/// `/dev/null` someone chose.
pub extern "C" fn record_stdout_at_start() {
    #[cfg(unix)]
    {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let open = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
        STDOUT_OPEN_AT_START.store(open, Ordering::Relaxed);
    }
}

/// Whether stdout was closed when the program started (`>&-`): the answer would be lost.
pub fn stdout_was_closed() -> bool {
    !STDOUT_OPEN_AT_START.load(Ordering::Relaxed)
}

/// The panic hook of the binary: one line on stderr (never a second panic if stderr is gone),
/// and nothing for panics that [`crate::budget::catch_panic`] turns into errors.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        if crate::budget::catching_panics() {
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        note!("zagreus: internal error: {msg}{at} (please report this)");
    }));
}

/// A progress bar on stderr for `total` steps: `[####----] done/total {msg} · ETA`, drawn by
/// indicatif on a terminal only (hidden otherwise), `unit` after the count.
pub fn progress_bar(total: usize, unit: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let target = if std::io::stderr().is_terminal() {
        indicatif::ProgressDrawTarget::stderr_with_hz(5)
    } else {
        indicatif::ProgressDrawTarget::hidden()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), target);
    let template = format!("[{{bar:24}}] {{pos}}/{{len}}{unit}{{msg}} · ETA {{eta}}");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("#-"),
    );
    bar
}
