//! The two output streams and what their failures mean.
//!
//! stdout carries the answer: a reader that closes the pipe early (`| head`) ends zagreus quietly
//! and successfully, any other write failure (`>/dev/full`) is an error, and a stdout that was
//! closed before zagreus started (`>&-`) is refused up front instead of silently losing the answer.
//! stderr carries logs: a failure to write them (`2>/dev/full`) never stops or aborts the program
//! ([`note!`] instead of `eprintln!`, which panics).

use std::io::Write;

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

/// Whether stdout was closed when the program started (`>&-`).
///
/// Rust's runtime reopens a closed standard descriptor on `/dev/null` (read-write) before `main`,
/// so such a stdout swallows the answer and every write "succeeds". A shell's `>/dev/null` opens
/// it write-only, which is how the two are told apart.
#[cfg(unix)]
pub fn stdout_was_closed() -> bool {
    // SAFETY: fcntl and fstat on descriptor 1 only read its state.
    unsafe {
        let flags = libc::fcntl(1, libc::F_GETFL);
        if flags == -1 {
            return true;
        }
        if flags & libc::O_ACCMODE != libc::O_RDWR {
            return false;
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(1, &mut st) != 0 {
            return true;
        }
        let mut null: libc::stat = std::mem::zeroed();
        let dev_null = c"/dev/null";
        libc::stat(dev_null.as_ptr(), &mut null) == 0
            && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
            && st.st_rdev == null.st_rdev
    }
}

#[cfg(not(unix))]
pub fn stdout_was_closed() -> bool {
    false
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
