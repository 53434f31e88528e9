//! `zagreus batch`: JSONL requests in, one JSONL result per request out, all of them run through
//! the scheduler at once. Results go to stdout in input order, or are appended to `-o FILE` as
//! they finish; a run over the same FILE again skips the requests already in it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cli::BatchArgs;
use crate::loader::{self, LoadedModel};
use crate::oneshot::Interrupted;
use crate::openai::{self, Endpoint, Input, Job};
use crate::scheduler::{Request, Scheduler, SchedulerConfig, Update};
use crate::settings::{SamplingRequest, Settings};

/// Most bytes of requests one run reads.
const INPUT_LIMIT: u64 = 1 << 30;
/// Most bytes of an existing results file read to resume.
const RESULTS_LIMIT: u64 = 4 << 30;
const STDOUT: &str = "cannot write the results to stdout";

/// One non-blank input line.
pub struct Line {
    /// 1-based line number in the input.
    pub number: usize,
    pub custom_id: String,
    /// Its `custom_id` is an earlier line's: the line gets an error record that does not stand
    /// for the earlier line's result when a run resumes.
    pub duplicate: bool,
    pub job: Result<Job>,
}

/// Reads the requests: a line is an OpenAI batch line (`custom_id`, `method`, `url`, `body`) or
/// a bare body (`messages` or `prompt`, with the sampling fields beside them).
pub fn parse_lines(text: &str) -> Vec<Line> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let (custom_id, mut job) = parse_line(number, raw);
        let duplicate = seen.contains_key(&custom_id);
        if let Some(first) = seen.get(&custom_id) {
            job = Err(anyhow::anyhow!(
                "custom_id {custom_id:?} is already used on line {first}"
            ));
        } else {
            seen.insert(custom_id.clone(), number);
        }
        out.push(Line {
            number,
            custom_id,
            duplicate,
            job,
        });
    }
    out
}

fn parse_line(number: usize, raw: &str) -> (String, Result<Job>) {
    let fallback = format!("line-{number}");
    let v: Value = match serde_json::from_str(raw) {
        Ok(v) => v,
        Err(e) => return (fallback, Err(anyhow::anyhow!("line {number} is not JSON: {e}"))),
    };
    let custom_id = match v.get("custom_id") {
        None | Some(Value::Null) => fallback,
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => {
            return (
                fallback,
                Err(anyhow::anyhow!(
                    "line {number}: custom_id {other} must be a non-empty string"
                )),
            )
        }
    };
    let job = (|| {
        let Some(obj) = v.as_object() else {
            bail!("line {number} is not a JSON object");
        };
        if let Some(body) = obj.get("body") {
            if let Some(m) = obj.get("method").filter(|m| m.as_str() != Some("POST")) {
                bail!("line {number}: method {m}: only POST requests can be run");
            }
            let endpoint = match obj.get("url") {
                Some(Value::String(u)) => Endpoint::from_url(u)?,
                Some(other) => bail!("line {number}: url {other} must be a string"),
                None => infer(body),
            };
            Job::from_body(endpoint, body).with_context(|| format!("line {number}"))
        } else {
            let mut body = obj.clone();
            body.remove("custom_id");
            let body = Value::Object(body);
            Job::from_body(infer(&body), &body).with_context(|| format!("line {number}"))
        }
    })();
    (custom_id, job)
}

/// A body's endpoint from its fields: `prompt` without `messages` is a completion.
fn infer(body: &Value) -> Endpoint {
    if body.get("messages").is_none() && body.get("prompt").is_some() {
        Endpoint::Completions
    } else {
        Endpoint::Chat
    }
}

/// The error code of a line whose `custom_id` an earlier line has: its record is not the
/// earlier line's result.
const DUPLICATE_ID: &str = "duplicate_custom_id";

/// What a results file already holds.
#[derive(Debug, Default)]
struct Finished {
    /// Requests with a record.
    ids: HashSet<String>,
    /// Input lines whose duplicate-id error record is written (by line number).
    duplicates: HashSet<usize>,
}

impl Finished {
    fn has(&self, line: &Line) -> bool {
        if line.duplicate {
            self.duplicates.contains(&line.number)
        } else {
            self.ids.contains(&line.custom_id)
        }
    }
}

/// The input line number of a result record this program wrote (`id` is `batch_req_N`, with
/// `custom_id`, `response` and `error` beside it), or `None` for anything else (a requests
/// file has `custom_id` too, but not these).
fn record_line(record: &Value) -> Option<usize> {
    let o = record.as_object()?;
    if !(o.contains_key("response") && o.contains_key("error") && o.get("custom_id")?.is_string()) {
        return None;
    }
    o.get("id")?.as_str()?.strip_prefix("batch_req_")?.parse().ok()
}

/// Whether an error record is a duplicate id's: by its code, or (files written before the code
/// existed) by its message.
fn is_duplicate(record: &Value) -> bool {
    let e = &record["error"];
    e["code"] == DUPLICATE_ID
        || e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("custom_id ") && m.contains(" is already used on line "))
}

/// What a results file already holds. Every whole line must be a result record of this
/// program, and a last line without its newline must be the start of one (a run killed while
/// writing it), so that a file of something else, the requests file included, is refused
/// untouched; then that cut-short line is removed, so the file holds whole records only.
fn finished(path: &Path) -> Result<Finished> {
    let mut done = Finished::default();
    if !path.exists() {
        return Ok(done);
    }
    let bytes = crate::bounded::read_file(path, RESULTS_LIMIT, "results file")?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let not_results = |what: String| {
        anyhow::anyhow!(
            "{} {what}: not a result record of zagreus batch; give -o a results file of an earlier run or a new file",
            path.display()
        )
    };
    let text = std::str::from_utf8(&bytes[..whole])
        .with_context(|| format!("{} is not UTF-8 text: is it a results file?", path.display()))?;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let record = serde_json::from_str::<Value>(line).unwrap_or(Value::Null);
        let Some(number) = record_line(&record) else {
            return Err(not_results(format!("line {}", i + 1)));
        };
        if is_duplicate(&record) {
            done.duplicates.insert(number);
        } else if let Some(id) = record["custom_id"].as_str() {
            done.ids.insert(id.to_string());
        }
    }
    if whole < bytes.len() {
        // Records are written `{"id":"batch_req_...` (keys in the order written); spacing aside.
        let start = br#"{"id":"batch_req_"#;
        let tail: Vec<u8> = bytes[whole..]
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .take(start.len())
            .collect();
        if !start.starts_with(&tail) {
            return Err(not_results("last line".into()));
        }
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.set_len(whole as u64)
            .with_context(|| format!("cannot remove the cut-short last line of {}", path.display()))?;
    }
    Ok(done)
}

/// Where records go: stdout in input order, or a file as they finish.
enum Sink {
    Stdout {
        /// Records that finished before an earlier line's, by position.
        waiting: BTreeMap<usize, Value>,
        next: usize,
    },
    File(File),
}

impl Sink {
    fn put(&mut self, position: usize, record: Value) -> Result<()> {
        match self {
            Sink::File(f) => {
                let mut line = serde_json::to_vec(&record)?;
                line.push(b'\n');
                // One write per record: a kill leaves at most one line cut short.
                f.write_all(&line).context("cannot write the results file")?;
                f.flush().context("cannot write the results file")?;
            }
            Sink::Stdout { waiting, next } => {
                waiting.insert(position, record);
                let mut out = std::io::stdout().lock();
                while let Some(r) = waiting.remove(next) {
                    let mut line = serde_json::to_vec(&r)?;
                    line.push(b'\n');
                    out.write_all(&line).context(STDOUT)?;
                    *next += 1;
                }
                out.flush().context(STDOUT)?;
            }
        }
        Ok(())
    }
}

fn ok_record(n: usize, custom_id: &str, body: Value) -> Value {
    json!({
        "id": format!("batch_req_{n}"),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": format!("req_{n}"), "body": body},
        "error": null,
    })
}

fn error_record(line: &Line, e: &str) -> Value {
    let code = if line.duplicate {
        DUPLICATE_ID
    } else {
        "invalid_request"
    };
    json!({
        "id": format!("batch_req_{}", line.number),
        "custom_id": line.custom_id,
        "response": null,
        "error": {"code": code, "message": e},
    })
}

/// Counts, and a progress bar on stderr (a terminal only): done/total, generated tokens per
/// second, ETA.
struct Progress {
    bar: indicatif::ProgressBar,
    total: usize,
    done: usize,
    errors: usize,
    prompt_tokens: usize,
    tokens: usize,
    start: Instant,
}

impl Progress {
    fn draw(&mut self) {
        let rate = self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_position(self.done as u64);
        self.bar.set_message(format!(" · {rate:.1} tok/s"));
    }
}

pub fn run(args: BatchArgs) -> Result<()> {
    let (bytes, what) = if args.input == "-" {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            bail!("no requests: give a JSONL file, or pipe the requests into stdin");
        }
        (
            crate::bounded::read_limited(stdin.lock(), INPUT_LIMIT, "stdin")?,
            "stdin".to_string(),
        )
    } else {
        let p = Path::new(&args.input);
        (
            crate::bounded::read_file(p, INPUT_LIMIT, "requests file")?,
            p.display().to_string(),
        )
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what} is not valid UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let lines = parse_lines(&text);
    let done = match &args.output {
        Some(p) => finished(p)?,
        None => Finished::default(),
    };
    let todo: Vec<&Line> = lines.iter().filter(|l| !done.has(l)).collect();
    let mut sink = match &args.output {
        Some(p) => Sink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {} for the results", p.display()))?,
        ),
        None => Sink::Stdout {
            waiting: BTreeMap::new(),
            next: 0,
        },
    };
    if lines.len() > todo.len() {
        crate::note!(
            "zagreus: {} of {} requests are already in the results file; running the other {}",
            lines.len() - todo.len(),
            lines.len(),
            todo.len()
        );
    }
    if todo.is_empty() {
        return Ok(());
    }
    let spec = args.model.spec();
    let (loaded, threads) = loader::load_for(&spec)?;
    let loaded = Arc::new(loaded);
    if args.verbose {
        crate::note!(
            "zagreus: loaded {} in {:.2} s",
            loaded.describe(threads),
            loaded.load_time.as_secs_f64()
        );
    }
    let context = loader::context_size(&spec, &loaded.model)?;
    let flags = args.sampling.request();
    let sched = Scheduler::start(loaded.clone(), SchedulerConfig::new(&loaded, args.parallel, context));
    let (tx, rx) = channel::<(usize, Update)>();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut progress = Progress {
        bar: crate::output::progress_bar(todo.len(), ""),
        total: todo.len(),
        done: 0,
        errors: 0,
        prompt_tokens: 0,
        tokens: 0,
        start: Instant::now(),
    };
    let generating = crate::interrupt::generating();
    let cancel = crate::interrupt::cancel_flag();
    // Jobs in flight, by position in `todo`.
    let mut running: HashMap<usize, (Job, openai::Prompt)> = HashMap::new();
    let mut next = 0;
    let window = args.parallel * 2;
    while progress.done < todo.len() {
        while running.len() < window && next < todo.len() {
            let (pos, line) = (next, todo[next]);
            next += 1;
            match prepare(&loaded, &flags, line, &spec, context) {
                Ok((job, req)) => {
                    let prompt = openai::Prompt {
                        ids: req.prompt.clone(),
                        ..Default::default()
                    };
                    match sched.submit_to(req, forward(tx.clone(), pos)) {
                        Ok(_) => {
                            running.insert(pos, (job, prompt));
                        }
                        Err(e) => {
                            finish_error(&mut sink, &mut progress, pos, line, &format!("{e:#}"))?;
                        }
                    }
                }
                Err(e) => finish_error(&mut sink, &mut progress, pos, line, &format!("{e:#}"))?,
            }
        }
        if progress.done >= todo.len() {
            break;
        }
        if cancel.load(Ordering::Relaxed) {
            drop(sched);
            progress.draw();
            progress.bar.abandon();
            if args.output.is_some() {
                crate::note!(
                    "zagreus: interrupted after {} of {} results; run the same command again to finish",
                    progress.done,
                    progress.total
                );
            }
            bail!(Interrupted);
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((pos, update)) => {
                let line = todo[pos];
                let (job, prompt) = running
                    .remove(&pos)
                    .context("internal error: an unknown request finished")?;
                match update {
                    Update::Done(c) => {
                        progress.prompt_tokens += c.stats.prompt_tokens;
                        progress.tokens += c.tokens.len();
                        let body = openai::response_body(
                            &job,
                            &format!("{}", line.number),
                            created,
                            &loaded.name,
                            &[prompt],
                            &[c],
                        );
                        progress.done += 1;
                        sink.put(pos, ok_record(line.number, &line.custom_id, body))?;
                    }
                    Update::Failed(e) => finish_error(&mut sink, &mut progress, pos, line, &e)?,
                    Update::Event(_) => {}
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("internal error: the scheduler stopped"),
        }
        progress.draw();
    }
    drop(generating);
    progress.draw();
    progress.bar.finish();
    if args.verbose {
        let secs = progress.start.elapsed().as_secs_f64();
        crate::note!(
            "zagreus: {} requests ({} errors) in {secs:.2} s: {} prompt tokens, {} generated, {:.1} tok/s generated",
            progress.total,
            progress.errors,
            progress.prompt_tokens,
            progress.tokens,
            progress.tokens as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

fn finish_error(sink: &mut Sink, progress: &mut Progress, pos: usize, line: &Line, e: &str) -> Result<()> {
    progress.done += 1;
    progress.errors += 1;
    sink.put(pos, error_record(line, e))
}

/// The scheduler's updates for one request, tagged with its position; events are not needed.
fn forward(tx: Sender<(usize, Update)>, pos: usize) -> crate::scheduler::Sink {
    Box::new(move |u| match u {
        Update::Event(_) => true,
        u => tx.send((pos, u)).is_ok(),
    })
}

/// A line's job, tokenized, with its settings resolved.
fn prepare(
    lm: &LoadedModel,
    flags: &SamplingRequest,
    line: &Line,
    spec: &loader::ModelSpec,
    context: usize,
) -> Result<(Job, Request)> {
    let job = match &line.job {
        Ok(j) => j.clone(),
        Err(e) => bail!("{e:#}"),
    };
    if job.choices() != 1 || job.echo {
        bail!(
            "line {}: zagreus batch runs one prompt and one choice per line, without echo",
            line.number
        );
    }
    let settings = Settings::resolve(&job.sampling.over(flags), &lm.generation)?;
    let constraint = lm
        .constraint_for(&job.shape)
        .with_context(|| format!("line {}", line.number))?;
    let prompt = match &job.inputs[0] {
        Input::Chat(messages) => lm.encode_chat(messages, &job.shape.tools, !spec.no_bos, context)?.1,
        Input::Text(text) => lm.encode_text(text, !spec.no_bos, context)?,
        Input::Tokens(ids) => lm.check_token_ids(ids)?.to_vec(),
    };
    let req = Request {
        prompt,
        settings,
        logprobs: job.logprobs,
        prompt_logprobs: None,
        constraint,
    };
    Ok((job, req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_ids_record_stands_for_its_own_line_in_files_of_every_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let lines = parse_lines("{\"custom_id\": \"a\", \"prompt\": \"x\"}\n{\"custom_id\": \"a\", \"prompt\": \"y\"}\n{\"custom_id\": \"b\", \"prompt\": \"z\"}");
        let message = format!("{:#}", lines[1].job.as_ref().unwrap_err());
        let now = error_record(&lines[1], &message);
        // Before the code existed, the record said `invalid_request`.
        let mut then = now.clone();
        then["error"]["code"] = json!("invalid_request");
        let ok = ok_record(3, "b", json!({}));
        for dup in [now, then] {
            std::fs::write(&path, format!("{dup}\n{ok}\n")).unwrap();
            let done = finished(&path).unwrap();
            let todo: Vec<usize> = lines.iter().filter(|l| !done.has(l)).map(|l| l.number).collect();
            assert_eq!(todo, [1], "only the first line is left to run");
        }
        // A record cut short is removed; the start of something else is refused, untouched.
        std::fs::write(&path, format!("{ok}\n{{\"id\":\"batch_req_1\",\"cus")).unwrap();
        finished(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{ok}\n"));
        std::fs::write(&path, format!("{ok}\nnotes")).unwrap();
        assert!(finished(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{ok}\nnotes"));
    }

    #[test]
    fn lines_of_both_formats_and_bad_ones() {
        let text = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "Ciao"}]}}

{"prompt": "C'era una volta", "temperature": 0}
not json
{"custom_id": "a", "messages": [{"role": "user", "content": "x"}]}
{"custom_id": "b", "url": "/v1/embeddings", "body": {"input": "x"}}
{"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}"#;
        let lines = parse_lines(text);
        let ids: Vec<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
        assert_eq!(ids, ["a", "line-3", "line-4", "a", "b", "c"]);
        assert_eq!(lines[0].job.as_ref().unwrap().endpoint, Endpoint::Chat);
        let j = lines[1].job.as_ref().unwrap();
        assert_eq!((j.endpoint, j.sampling.temperature), (Endpoint::Completions, Some(0.0)));
        let errors: Vec<String> = lines[2..]
            .iter()
            .map(|l| format!("{:#}", l.job.as_ref().unwrap_err()))
            .collect();
        assert!(errors[0].contains("line 4 is not JSON"), "{}", errors[0]);
        assert!(errors[1].contains("already used on line 1"), "{}", errors[1]);
        assert!(errors[2].contains("/v1/embeddings"), "{}", errors[2]);
        assert!(errors[3].contains("only POST"), "{}", errors[3]);
    }
}
