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

/// Draws a progress line on stderr (a terminal only: callers check), in place:
/// `[####----] done/total{tail}`.
pub fn progress_line(done: usize, total: usize, tail: &str) {
    use std::io::Write;
    let width = 24;
    let filled = (width * done).checked_div(total).unwrap_or(width).min(width);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r\x1b[2K[{}{}] {done}/{total}{tail}",
        "#".repeat(filled),
        "-".repeat(width - filled)
    );
    let _ = err.flush();
}

/// `M:SS` for an estimate of the time left: `secs` so far for `done` of `total`.
pub fn eta(secs: f64, done: usize, total: usize) -> String {
    let left = if done > 0 {
        secs / done as f64 * total.saturating_sub(done) as f64
    } else {
        0.0
    };
    format!("{}:{:02}", left as u64 / 60, left as u64 % 60)
}
