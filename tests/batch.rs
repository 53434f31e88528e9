//! `zagreus batch` end to end: JSONL in, one result per request out, in input order on stdout;
//! a bad line gets an error record and the rest go on; `-o FILE` resumes after a kill without
//! losing or repeating a request.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{assert_clean_error, run, zagreus};
use common::{asset, model_dir};
use serde_json::{json, Value};

fn smollm2() -> String {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf").to_str().unwrap().to_string()
}

fn tied() -> String {
    model_dir("tied-bf16").to_str().unwrap().to_string()
}

fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// `zagreus batch -m MODEL -o RESULTS INPUT`.
fn batch_to_file<'a>(model: &'a str, results: &'a std::path::Path, input: &'a std::path::Path) -> [&'a str; 6] {
    [
        "batch",
        "-m",
        model,
        "-o",
        results.to_str().unwrap(),
        input.to_str().unwrap(),
    ]
}

fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|l| l.to_string() + "\n").collect()
}

/// The generated text of a result record.
fn text(r: &Value) -> &str {
    let choice = &r["response"]["body"]["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {r}"))
}

#[test]
fn smollm2_answers_many_requests_in_input_order() {
    let question = |q: &str| json!({"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 24});
    let mut lines = vec![
        json!({"custom_id": "france", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}}),
        json!({"custom_id": "story", "url": "/v1/completions",
               "body": {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}}),
    ];
    for q in ["Name a color.", "What is 2+2?", "Say hello.", "Name a fruit."] {
        lines.push(question(q));
    }
    let input = jsonl(&lines) + "{\"messages\": \"not a list\"}\n";
    let out = run(&["batch", "-m", &smollm2(), "--parallel", "4"], input.as_bytes());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let recs = records(&out.stdout);
    let ids: Vec<&str> = recs.iter().map(|r| r["custom_id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["france", "story", "line-3", "line-4", "line-5", "line-6", "line-7"]
    );
    assert_eq!(text(&recs[0]), "The capital of France is Paris.");
    let body = &recs[0]["response"]["body"];
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(recs[1]["response"]["body"]["object"], "text_completion");
    assert_eq!(recs[1]["response"]["body"]["usage"]["completion_tokens"], 6);
    assert_eq!(recs[1]["response"]["body"]["choices"][0]["finish_reason"], "length");
    // The bad line: an error record in its place, the others answered.
    assert!(recs[6]["response"].is_null());
    assert!(
        recs[6]["error"]["message"].as_str().unwrap().contains("line 7"),
        "{}",
        recs[6]
    );
    // Each answer is the one the one-shot command gives for the same request.
    for (i, q) in ["Name a color.", "What is 2+2?", "Say hello.", "Name a fruit."]
        .iter()
        .enumerate()
    {
        let one = run(&["-m", &smollm2(), "--temperature", "0", "-n", "24", q], b"");
        assert_eq!(one.code, 0, "{}", one.stderr);
        assert_eq!(text(&recs[2 + i]), one.stdout.trim_end_matches('\n'), "{q}");
    }
}

#[test]
fn a_file_of_requests_and_stdin_give_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<Value> = (0..5)
        .map(|i| json!({"custom_id": format!("r{i}"), "prompt": format!("uno {i} due"), "max_tokens": 4 + i, "temperature": 0}))
        .collect();
    let file = dir.path().join("requests.jsonl");
    std::fs::write(&file, jsonl(&lines)).unwrap();
    let from_file = run(&["batch", "-m", &tied(), file.to_str().unwrap()], b"");
    assert_eq!(from_file.code, 0, "{}", from_file.stderr);
    let from_stdin = run(&["batch", "-m", &tied(), "-"], jsonl(&lines).as_bytes());
    assert_eq!(from_stdin.code, 0, "{}", from_stdin.stderr);
    let strip = |s: &str| -> Vec<Value> {
        records(s)
            .into_iter()
            .map(|mut r| {
                r["response"]["body"]["created"] = json!(0);
                r["response"]["body"]["timings"] = json!(null);
                r
            })
            .collect()
    };
    assert_eq!(strip(&from_file.stdout), strip(&from_stdin.stdout));
    let recs = records(&from_file.stdout);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["custom_id"], format!("r{i}"));
        assert_eq!(
            r["response"]["body"]["usage"]["completion_tokens"].as_u64().unwrap(),
            4 + i as u64
        );
    }
    // Bad input as a whole: a clear error, no results.
    assert_clean_error(
        &run(
            &["batch", "-m", &tied(), dir.path().join("none.jsonl").to_str().unwrap()],
            b"",
        ),
        &["none.jsonl"],
    );
    assert_clean_error(
        &run(&["batch", "-m", &tied()], b"{\"prompt\": \"\xff\"}\n"),
        &["stdin", "UTF-8"],
    );
    let out = run(&["batch", "-m", &tied(), "--parallel", "0"], b"");
    assert_eq!(out.code, 2, "clap's usage error: {}", out.stderr);
    assert!(out.stderr.contains("--parallel") && out.stdout.is_empty());
}

/// A run the test kills; killed on drop too, so a failing test leaves no process behind.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_run_resumes_without_losing_or_repeating_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let n = 12;
    let lines: Vec<Value> = (0..n)
        .map(|i| {
            json!({"custom_id": format!("q{i}"), "messages": [{"role": "user", "content": format!("Count to {}.", i + 3)}],
                   "max_tokens": 160, "ignore_eos": true, "temperature": 0})
        })
        .collect();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, jsonl(&lines)).unwrap();
    let results = dir.path().join("out.jsonl");
    let args = [
        "batch",
        "-m",
        &smollm2(),
        "--parallel",
        "2",
        "-o",
        results.to_str().unwrap(),
        input.to_str().unwrap(),
    ];
    let mut child = Running(
        zagreus()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Kill it once a few results are in, long before all of them are.
    let t = Instant::now();
    loop {
        let have = std::fs::read_to_string(&results)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if have >= 2 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no results after two minutes");
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let partial = std::fs::read_to_string(&results).unwrap();
    let before = partial.lines().count();
    assert!(before < n, "{before} of {n} done before the kill");
    // As if the kill had come in the middle of writing a line.
    std::fs::write(
        &results,
        partial.clone() + "{\"id\": \"batch_req_9\", \"custom_id\": \"q",
    )
    .unwrap();
    let out = common::cli::run_cmd(
        {
            let mut c = zagreus();
            c.args(args);
            c
        },
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("{before} of {n} requests are already")),
        "{}",
        out.stderr
    );
    let all = std::fs::read_to_string(&results).unwrap();
    assert!(
        all.starts_with(&partial),
        "the first run's records are kept as they were"
    );
    let mut ids: Vec<String> = records(&all)
        .iter()
        .map(|r| r["custom_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("q{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "every request exactly once");
    for r in records(&all) {
        assert_eq!(r["response"]["body"]["usage"]["completion_tokens"], 160);
    }
    // A third run has nothing left to do.
    let again = common::cli::run_cmd(
        {
            let mut c = zagreus();
            c.args(args);
            c
        },
        b"",
    );
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(&results).unwrap(), all);
}

#[test]
fn a_duplicate_ids_error_record_is_not_taken_for_the_first_lines_result() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        json!({"custom_id": "a", "prompt": "uno due", "max_tokens": 3, "temperature": 0}),
        json!({"custom_id": "a", "prompt": "tre", "max_tokens": 3}),
        json!({"custom_id": "b", "prompt": "quattro", "max_tokens": 3, "temperature": 0}),
    ];
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, jsonl(&lines)).unwrap();
    let results = dir.path().join("out.jsonl");
    let model = tied();
    let args = batch_to_file(&model, &results, &input);
    let first = run(&args, b"");
    assert_eq!(first.code, 0, "{}", first.stderr);
    let recs = records(&std::fs::read_to_string(&results).unwrap());
    assert_eq!(recs.len(), 3);
    let dup = recs
        .iter()
        .find(|r| r["error"]["code"] == "duplicate_custom_id")
        .expect("the second line's error record");
    assert_eq!(
        (dup["custom_id"].as_str(), dup["id"].as_str()),
        (Some("a"), Some("batch_req_2"))
    );
    // As if the run had been killed before the first line finished (its duplicate's error record
    // is written at once, before it): the rerun must still answer it, and only it.
    let kept: Vec<Value> = recs
        .into_iter()
        .filter(|r| !(r["custom_id"] == "a" && r["error"].is_null()))
        .collect();
    std::fs::write(&results, jsonl(&kept)).unwrap();
    let again = run(&args, b"");
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stderr.contains("2 of 3 requests are already"), "{}", again.stderr);
    let all = records(&std::fs::read_to_string(&results).unwrap());
    assert_eq!(all.len(), 3, "{all:?}");
    let answered = all.iter().find(|r| r["custom_id"] == "a" && r["error"].is_null());
    assert_eq!(
        answered.expect("line 1 answered")["response"]["body"]["usage"]["completion_tokens"],
        3
    );
    // A file that is not a results file is refused and left as it was (no "cut-short line"
    // cut): lines of notes, a single line without a newline, the requests file itself.
    let notes = dir.path().join("notes.txt");
    let one_line = dir.path().join("one-line.txt");
    std::fs::write(&notes, "my notes\nthe last line, no newline").unwrap();
    std::fs::write(&one_line, "my notes").unwrap();
    let requests = std::fs::read_to_string(&input).unwrap();
    for file in [&notes, &one_line, &input] {
        let before = std::fs::read(file).unwrap();
        let refused = run(&batch_to_file(&model, file, &input), b"");
        assert_clean_error(
            &refused,
            &[file.file_name().unwrap().to_str().unwrap(), "not a result record"],
        );
        assert_eq!(std::fs::read(file).unwrap(), before);
    }
    assert_eq!(std::fs::read_to_string(&input).unwrap(), requests);
}
