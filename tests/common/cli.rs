//! Running the real binary as a user does: its exit code, both streams, how long it took and
//! how much memory it used at its peak, and the shape every failure must have.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin;

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The binary, without a model from the environment and without colours.
pub fn zagreus() -> Command {
    let mut c = Command::new(cargo_bin("zagreus"));
    c.env_remove("ZAGREUS_MODEL").env("NO_COLOR", "1");
    c
}

/// Runs `zagreus args` with `stdin` piped in.
pub fn run(args: &[&str], stdin: &[u8]) -> Out {
    let mut c = zagreus();
    c.args(args);
    run_cmd(c, stdin)
}

/// Runs a prepared command with `stdin` piped in. stdout must be UTF-8 (zagreus never prints
/// anything else).
pub fn run_cmd(mut c: Command, stdin: &[u8]) -> Out {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut sin = child.stdin.take().unwrap();
        let _ = sin.write_all(stdin);
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A failed run: non-zero exit, one line on stderr that starts with "zagreus: error:" and
/// contains every `needle`, nothing on stdout, no panic.
pub fn assert_clean_error(out: &Out, needles: &[&str]) {
    assert_ne!(out.code, 0, "expected failure, stdout: {}", out.stdout);
    assert!(out.stdout.is_empty(), "stdout must stay empty on error: {}", out.stdout);
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("internal error"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stderr.starts_with("zagreus: error: "), "{}", out.stderr);
    for n in needles {
        assert!(out.stderr.contains(n), "stderr lacks {n:?}: {}", out.stderr);
    }
}

/// A failed run after some progress lines (downloads): as [`assert_clean_error`], but only the
/// last stderr line is the error; the lines before it are zagreus' own.
pub fn assert_failed(out: &Out, needles: &[&str]) {
    assert_ne!(out.code, 0, "expected failure: {}", out.stdout);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("internal error"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.lines().all(|l| l.starts_with("zagreus: ")),
        "only zagreus' own lines on stderr: {}",
        out.stderr
    );
    let last = out.stderr.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("zagreus: error: "), "{}", out.stderr);
    for n in needles {
        assert!(last.contains(n), "missing {n:?} in: {}", out.stderr);
    }
}

/// Copies a fixture model directory.
pub fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// What feeds a measured run's stdin.
pub enum Input {
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// A file or device (`/dev/zero`).
    File(std::path::PathBuf),
    Nothing,
}

/// A run with its wall time and peak resident memory.
pub struct Measured {
    pub out: Out,
    pub elapsed: Duration,
    pub peak_rss_mb: f64,
}

/// Runs the binary, killing it after `limit`, and measures its peak RSS (`wait4`'s rusage).
// The child is reaped by `wait4` (std's `wait` would discard the resource usage).
#[allow(clippy::zombie_processes)]
pub fn run_measured(args: &[&str], input: Input, limit: Duration) -> Measured {
    let mut c = zagreus();
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    match &input {
        Input::Bytes(_) => c.stdin(Stdio::piped()),
        Input::File(p) => c.stdin(Stdio::from(std::fs::File::open(p).unwrap())),
        Input::Nothing => c.stdin(Stdio::null()),
    };
    let start = Instant::now();
    let mut child = c.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let feeder = match (input, child.stdin.take()) {
        (Input::Bytes(b), Some(mut sin)) => Some(std::thread::spawn(move || {
            // The child may stop reading early (that is the point): ignore EPIPE.
            let _ = sin.write_all(&b);
        })),
        _ => None,
    };
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let watchdog = std::thread::spawn(move || {
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: probing our own child.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: killing our own child, which outlived its limit.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    });
    let mut status = 0;
    // SAFETY: plain wait4 on our child's pid; rusage is written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    let elapsed = start.elapsed();
    let _ = watchdog.join();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    assert!(elapsed < limit, "the run did not finish within {limit:?} (killed)");
    Measured {
        out: Out {
            code,
            stdout: String::from_utf8(stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        },
        elapsed,
        // Linux reports ru_maxrss in KiB.
        peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
    }
}
