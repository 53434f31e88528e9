//! The one-shot and pipe front end: one prompt (argument, stdin, or both) in, one answer out.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cli::RunArgs;
use crate::loader::{self, LoadedModel};
use crate::sampling::Sampler;
use crate::session::{generate, Completion, GenerateOptions, Session, TokenLogprob};
use crate::settings::Settings;
use crate::template::Message;
use crate::tools::{parse_answer, CallSplitter, Piece, ToolCall, ToolDef};

const STDOUT: &str = "cannot write the answer to stdout";

/// Joins stdin (when it is not a terminal) and the prompt argument: stdin first, a blank line,
/// then the argument.
pub fn assemble_prompt(arg: &[String], stdin: Option<Vec<u8>>) -> Result<String> {
    let arg = arg.join(" ");
    let piped = match stdin {
        Some(bytes) => String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "stdin is not valid UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            )
        })?,
        None => String::new(),
    };
    let piped = piped.trim_end();
    Ok(match (piped.is_empty(), arg.trim().is_empty()) {
        (true, true) => bail!("no prompt: give one as an argument, or pipe text into stdin"),
        (false, true) => piped.to_string(),
        (true, false) => arg,
        (false, false) => format!("{piped}\n\n{arg}"),
    })
}

fn read_stdin_if_piped() -> Result<Option<Vec<u8>>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let buf = crate::bounded::read_limited(stdin.lock(), crate::bounded::STDIN_LIMIT, "stdin")?;
    Ok(Some(buf))
}

/// Renders and tokenizes one request for a context of `context` tokens. Text that certainly
/// cannot fit is refused before it is rendered or tokenized (a gigabyte of input costs nothing).
pub fn build_prompt(
    m: &LoadedModel,
    text: &str,
    system: Option<&str>,
    tools: &[ToolDef],
    raw: bool,
    add_bos: bool,
    context: usize,
) -> Result<(String, Vec<u32>)> {
    if raw {
        if system.is_some() {
            bail!("--system has no effect with --raw (there is no template to put it in)");
        }
        if !tools.is_empty() {
            bail!("--tools needs the chat template, which --raw leaves out");
        }
        return Ok((text.to_string(), m.encode_text(text, add_bos, context)?));
    }
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", text));
    m.encode_chat(&messages, tools, add_bos, context)
}

pub fn run(args: RunArgs) -> Result<()> {
    let stdin = read_stdin_if_piped()?;
    let text = assemble_prompt(&args.prompt, stdin)?;
    let (loaded, threads) = loader::load_for(&args.model.spec())?;
    let model = &loaded.model;
    if args.verbose {
        crate::note!(
            "zagreus: loaded {} in {:.2} s",
            loaded.describe(threads),
            loaded.load_time.as_secs_f64()
        );
    }
    if !args.raw && loaded.lacks_chat_format() {
        crate::note!("zagreus: warning: the model has no chat template and no ChatML tokens (a base model?); use --raw to send the prompt as is");
    }
    let settings = Settings::resolve(&args.sampling.request(), &loaded.generation)?;
    let context = loader::context_size(&args.model.spec(), model)?;
    let shape = args.shape.shape()?;
    let constraint = loaded.constraint_for(&shape)?;
    let (rendered, ids) = build_prompt(
        &loaded,
        &text,
        args.system.as_deref(),
        &shape.tools,
        args.raw,
        !args.model.no_bos,
        context,
    )?;
    if args.verbose_prompt {
        crate::note!(
            "zagreus: prompt ({} tokens):\n{rendered}\nzagreus: token ids: {ids:?}",
            ids.len()
        );
    }
    if ids.len() > context {
        bail!(
            "the prompt is {} tokens, more than the context of {context} tokens{}; shorten it",
            ids.len(),
            if args.model.ctx_size.is_some() {
                " (--ctx-size)"
            } else {
                " (the model's max_position_embeddings)"
            }
        );
    }
    let mut session = Session::new(model, context);
    let mut sampler = Sampler::new(settings.sampling.clone());
    let opts = GenerateOptions {
        max_tokens: settings.max_tokens,
        stop_ids: loaded.stop_ids.clone(),
        stop_strings: settings.stop.clone(),
        ignore_eos: settings.ignore_eos,
        logprobs: args.logprobs,
        constraint,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stream_text = !args.json;
    // With tools, calls come out as JSON lines, the text around them as it streams.
    let salt = settings.sampling.seed.to_string();
    let mut splitter = shape.parses_calls().then(|| CallSplitter::new(&salt));
    let mut at_line_start = true;
    let generating = crate::interrupt::generating();
    let completion = generate(
        &mut session,
        &loaded.tokenizer,
        &mut sampler,
        &ids,
        &opts,
        crate::interrupt::cancel_flag(),
        &mut |piece| {
            if stream_text {
                match &mut splitter {
                    Some(s) => print_pieces(&mut out, s.push(piece), &mut at_line_start)?,
                    None => print_text(&mut out, piece, &mut at_line_start)?,
                }
            }
            Ok(())
        },
    )?;
    drop(generating);
    if let (true, Some(s)) = (stream_text, &mut splitter) {
        print_pieces(&mut out, s.finish(), &mut at_line_start)?;
    }
    let parsed = shape.parses_calls().then(|| parse_answer(&completion.text, &salt));
    if args.json {
        let mut record = JsonRecord::new(&loaded, &settings, &ids, &completion, args.logprobs.is_some());
        if let Some(p) = &parsed {
            record.content = Some(&p.content);
            record.tool_calls = Some(&p.calls);
        }
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        out.write_all(&line).context(STDOUT)?;
    } else if !at_line_start {
        out.write_all(b"\n").context(STDOUT)?;
    }
    out.flush().context(STDOUT)?;
    if completion.stats.context_full {
        crate::note!("zagreus: the context of {context} tokens is full; the answer was cut short (--ctx-size)");
    }
    if args.verbose {
        print_stats(&completion, settings.sampling.seed);
    }
    // The process ends right after: let the OS reclaim the model instead of freeing the
    // tokenizer's many small allocations one by one (about 0.1 s for a Llama-3 vocabulary).
    std::mem::forget(session);
    std::mem::forget(loaded);
    if completion.finish == crate::session::FinishReason::Cancelled {
        bail!(Interrupted);
    }
    Ok(())
}

/// Generation was stopped by Ctrl+C (exit code 130).
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn print_stats(c: &Completion, seed: u64) {
    let s = &c.stats;
    crate::note!(
        "zagreus: prompt: {} tokens ({} processed) in {:.2} s, {:.1} t/s",
        s.prompt_tokens,
        s.prompt_processed,
        s.prompt_time.as_secs_f64(),
        s.prompt_tps()
    );
    crate::note!(
        "zagreus: generated: {} tokens in {:.2} s, {:.1} t/s; time to first token {:.2} s",
        s.generated,
        s.decode_time.as_secs_f64(),
        s.decode_tps(),
        s.time_to_first_token.as_secs_f64()
    );
    crate::note!(
        "zagreus: finish: {}; seed: {seed}; context used: {}",
        c.finish.as_str(),
        s.context_used
    );
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Streams answer text to stdout, remembering whether a line is open.
fn print_text(out: &mut impl Write, text: &str, at_line_start: &mut bool) -> Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .context(STDOUT)?;
    *at_line_start = text.ends_with('\n');
    Ok(())
}

/// Content as text; each call as one JSON line (`{"id", "name", "arguments"}`).
fn print_pieces(out: &mut impl Write, pieces: Vec<Piece>, at_line_start: &mut bool) -> Result<()> {
    for p in pieces {
        match p {
            Piece::Content(text) => {
                // Whitespace between calls is not worth a line of its own.
                let text = if *at_line_start {
                    text.trim_start().to_string()
                } else {
                    text
                };
                print_text(out, &text, at_line_start)?
            }
            Piece::Call(call) => {
                if !*at_line_start {
                    out.write_all(b"\n").context(STDOUT)?;
                }
                let mut line = serde_json::to_vec(&call)?;
                line.push(b'\n');
                out.write_all(&line).and_then(|_| out.flush()).context(STDOUT)?;
                *at_line_start = true;
            }
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    model: &'a str,
    text: &'a str,
    /// With tools: the text outside the calls, and the calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a [ToolCall]>,
    finish_reason: &'static str,
    stop_token_id: Option<u32>,
    prompt_token_ids: &'a [u32],
    generated_token_ids: &'a [u32],
    seed: u64,
    settings: &'a Settings,
    usage: Usage,
    timings: Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<&'a [TokenLogprob]>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    prompt_tokens_processed: usize,
    completion_tokens: usize,
}

#[derive(Serialize)]
struct Timings {
    load_ms: f64,
    prompt_ms: f64,
    prompt_tokens_per_s: f64,
    time_to_first_token_ms: f64,
    decode_ms: f64,
    decode_tokens_per_s: f64,
}

impl<'a> JsonRecord<'a> {
    fn new(m: &'a LoadedModel, settings: &'a Settings, ids: &'a [u32], c: &'a Completion, logprobs: bool) -> Self {
        let s = &c.stats;
        Self {
            model: &m.name,
            text: &c.text,
            content: None,
            tool_calls: None,
            finish_reason: c.finish.as_str(),
            stop_token_id: c.stop_token,
            prompt_token_ids: ids,
            generated_token_ids: &c.tokens,
            seed: settings.sampling.seed,
            settings,
            usage: Usage {
                prompt_tokens: s.prompt_tokens,
                prompt_tokens_processed: s.prompt_processed,
                completion_tokens: s.generated,
            },
            timings: Timings {
                load_ms: ms(m.load_time),
                prompt_ms: ms(s.prompt_time),
                prompt_tokens_per_s: s.prompt_tps(),
                time_to_first_token_ms: ms(s.time_to_first_token),
                decode_ms: ms(s.decode_time),
                decode_tokens_per_s: s.decode_tps(),
            },
            logprobs: if logprobs { Some(&c.logprobs) } else { None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_comes_first_then_a_blank_line() {
        let arg = vec!["Riassumi".to_string(), "il testo.".to_string()];
        assert_eq!(
            assemble_prompt(&arg, Some(b"Un articolo.\n".to_vec())).unwrap(),
            "Un articolo.\n\nRiassumi il testo."
        );
        assert_eq!(
            assemble_prompt(&[], Some(b"solo stdin\n".to_vec())).unwrap(),
            "solo stdin"
        );
        assert_eq!(assemble_prompt(&arg, Some(Vec::new())).unwrap(), "Riassumi il testo.");
        assert!(assemble_prompt(&[], Some(b"  \n".to_vec())).is_err());
        let err = assemble_prompt(&[], Some(vec![b'o', b'k', 0xff]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("UTF-8") && err.contains("offset 2"), "{err}");
    }
}
