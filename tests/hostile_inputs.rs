//! Careless and hostile inputs to the binary: oversized and endless stdin, devices and FIFOs
//! where files belong, flags with absurd values, and output streams that fail. Each is refused
//! quickly with one clear line, within a memory bound, never a hang, a panic or an abort.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::cli::{assert_clean_error, run, run_measured, zagreus, Input};
use common::model_dir;

fn tied() -> String {
    model_dir("tied-bf16").display().to_string()
}

/// Peak memory the refusals below may use: the tiny fixture model, the stdin bound and change.
const SMALL_RSS_MB: f64 = 200.0;

#[test]
fn forty_megabytes_on_stdin_are_refused_at_once() {
    // Before: tokenized whole, 7 GB of memory, aborted after 54 s.
    let m = run_measured(
        &["-m", &tied(), "Riassumi."],
        Input::Bytes(vec![b'a'; 40 << 20]),
        Duration::from_secs(20),
    );
    assert_clean_error(&m.out, &["stdin", "32 MiB"]);
    assert!(m.peak_rss_mb < SMALL_RSS_MB, "peak RSS {:.0} MB", m.peak_rss_mb);
    assert!(m.elapsed < Duration::from_secs(5), "{:?}", m.elapsed);
}

#[test]
fn dev_zero_as_stdin_is_refused_at_the_bound() {
    let m = run_measured(
        &["-m", &tied(), "Riassumi."],
        Input::File("/dev/zero".into()),
        Duration::from_secs(20),
    );
    assert_clean_error(&m.out, &["stdin", "32 MiB"]);
    assert!(m.peak_rss_mb < SMALL_RSS_MB, "peak RSS {:.0} MB", m.peak_rss_mb);
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_without_tokenizing_it() {
    // 30 MB: under the stdin bound, far over what 64 tokens of 17 bytes at most can hold.
    let m = run_measured(
        &["-m", &tied(), "Riassumi."],
        Input::Bytes("parola ".repeat(30 << 20 >> 3).into_bytes()),
        Duration::from_secs(20),
    );
    assert_clean_error(&m.out, &["the prompt is", "64 tokens", "1088 bytes"]);
    // Tokenizing it would take gigabytes; refusing it costs the input itself.
    assert!(m.peak_rss_mb < SMALL_RSS_MB, "peak RSS {:.0} MB", m.peak_rss_mb);
    assert!(m.elapsed < Duration::from_secs(5), "{:?}", m.elapsed);
}

#[test]
fn devices_where_files_belong_are_refused() {
    for flag in ["--chat-template", "--tokenizer"] {
        let m = run_measured(
            &["-m", &tied(), flag, "/dev/zero", "Ciao"],
            Input::Nothing,
            Duration::from_secs(20),
        );
        assert_clean_error(&m.out, &["/dev/zero", "not a regular file"]);
        assert!(m.peak_rss_mb < SMALL_RSS_MB, "{flag}: peak RSS {:.0} MB", m.peak_rss_mb);
    }
}

#[test]
fn files_over_their_bound_are_refused_with_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("huge.jinja");
    std::fs::write(&big, "x".repeat(2 << 20)).unwrap();
    assert_clean_error(
        &run(&["-m", &tied(), "--chat-template", big.to_str().unwrap(), "Ciao"], b""),
        &["huge.jinja", "1 MiB"],
    );
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifos_never_block() {
    // Nobody ever writes to these FIFOs: opening one for reading would wait forever.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    mkfifo(&fifo);
    let m = run_measured(
        &["-m", fifo.to_str().unwrap(), "Ciao"],
        Input::Nothing,
        Duration::from_secs(20),
    );
    assert_clean_error(&m.out, &["model.gguf", "not a regular file"]);
    let tmpl = dir.path().join("template.jinja");
    mkfifo(&tmpl);
    let m = run_measured(
        &["-m", &tied(), "--chat-template", tmpl.to_str().unwrap(), "Ciao"],
        Input::Nothing,
        Duration::from_secs(20),
    );
    assert_clean_error(&m.out, &["template.jinja", "not a regular file"]);
    // A model directory whose config.json is a FIFO.
    let model = dir.path().join("model");
    common::cli::copy_model(&model_dir("tied-bf16"), &model);
    std::fs::remove_file(model.join("config.json")).unwrap();
    mkfifo(&model.join("config.json"));
    let m = run_measured(
        &["-m", model.to_str().unwrap(), "Ciao"],
        Input::Nothing,
        Duration::from_secs(20),
    );
    assert_clean_error(&m.out, &["config.json"]);
}

#[test]
fn absurd_flag_values_are_refused_before_any_work() {
    // Before: aborted allocating, or spent minutes starting threads.
    for (args, flag) in [
        (
            vec!["bench", "--random", "zagreus-0.4b", "-p", "3000000000"],
            "--prompt",
        ),
        (
            vec!["bench", "--random", "zagreus-0.4b", "-d", "1000000000000"],
            "--depth",
        ),
        (vec!["bench", "--random", "zagreus-0.4b", "-n", "99999999999"], "--gen"),
        (vec!["bench", "--random", "zagreus-0.4b", "-r", "0"], "--repetitions"),
        (vec!["bench", "--random", "zagreus-0.4b", "--batch", "0"], "--batch"),
        (
            vec!["bench", "--random", "zagreus-0.4b", "--batch", "2,5000"],
            "--batch",
        ),
        (vec!["--threads", "100000", "Ciao"], "--threads"),
        (vec!["--ctx-size", "0", "Ciao"], "--ctx-size"),
        (vec!["--temperature", "NaN", "Ciao"], "--temperature"),
        (vec!["--top-p", "inf", "Ciao"], "--top-p"),
        (vec!["--json", "--logprobs", "1000000", "Ciao"], "--logprobs"),
        (vec!["-n", "1e12", "Ciao"], "--max-tokens"),
    ] {
        let m = run_measured(&args, Input::Nothing, Duration::from_secs(10));
        assert_eq!(m.out.code, 2, "{args:?}: clap's usage error: {}", m.out.stderr);
        assert!(m.out.stderr.contains(flag), "{args:?}: {}", m.out.stderr);
        assert!(m.out.stdout.is_empty());
        assert!(m.elapsed < Duration::from_secs(2), "{args:?}: {:?}", m.elapsed);
    }
}

#[test]
fn bench_lengths_beyond_the_context_are_refused_before_allocating() {
    let m = run_measured(
        &["bench", "--random", "smollm2-135m", "-p", "100000", "-r", "1"],
        Input::Nothing,
        Duration::from_secs(60),
    );
    assert_clean_error(&m.out, &["-p 100000", "context of 8192"]);
    let m = run_measured(
        &[
            "bench",
            "--random",
            "smollm2-135m",
            "-p",
            "0",
            "-n",
            "8",
            "-d",
            "9000",
            "-r",
            "1",
        ],
        Input::Nothing,
        Duration::from_secs(60),
    );
    assert_clean_error(&m.out, &["-d 9000", "context of 8192"]);
    // Many sequences: their keys and values together are bounded before any is allocated.
    let m = run_measured(
        &[
            "bench",
            "--random",
            "smollm2-135m",
            "-p",
            "8000",
            "-n",
            "1",
            "--batch",
            "1,1024",
        ],
        Input::Nothing,
        Duration::from_secs(60),
    );
    // The real figure: 1024 x 8001 positions x 46080 bytes (SmolLM2's shape, f32) is 351 GiB.
    assert_clean_error(&m.out, &["1024 sequences of 8001 tokens need 351 GiB", "16 GiB"]);
    assert!(m.elapsed < Duration::from_secs(20), "{:?}", m.elapsed);
}

#[test]
fn a_failing_stderr_neither_aborts_nor_loses_the_answer() {
    // Before: the first log line panicked, and the panic message failed too: abort, no answer.
    let mut c = zagreus();
    c.args(["-m", &tied(), "--temperature", "0", "-n", "4", "--verbose", "Ciao"])
        .stderr(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap());
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!out.stdout.is_empty());
}

#[test]
fn a_closed_stdout_is_an_error_and_a_full_one_too() {
    // `>&-`: the runtime puts /dev/null (read-write) in its place; the answer would be lost.
    let mut c = zagreus();
    c.args(["-m", &tied(), "-n", "2", "Ciao"]);
    // SAFETY: closing fd 1 in the child just before exec, as the shell's `>&-` does.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            libc::close(1);
            Ok(())
        });
    }
    let out = c.stdin(Stdio::null()).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("zagreus: error: stdout is closed"), "{err}");
    // `>/dev/null` is a choice, not an accident: fine, also opened read-write as Python's
    // subprocess.DEVNULL does (which looks exactly like what the runtime puts in place of `>&-`).
    for read in [false, true] {
        let mut c = zagreus();
        let null = std::fs::OpenOptions::new()
            .read(read)
            .write(true)
            .open("/dev/null")
            .unwrap();
        c.args(["-m", &tied(), "-n", "2", "Ciao"]).stdout(null);
        assert_eq!(c.stdin(Stdio::null()).output().unwrap().status.code(), Some(0));
    }
    // `>/dev/full`: the answer cannot be written.
    let mut c = zagreus();
    c.args(["-m", &tied(), "-n", "2", "Ciao"])
        .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap());
    let out = c.stdin(Stdio::null()).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write the answer to stdout"), "{err}");
}
