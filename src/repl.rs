//! The interactive chat in a terminal: line editing with a persistent history, `"""` blocks and
//! bracketed paste for multi-line messages, streamed answers that Ctrl+C stops without ending the
//! session, slash commands, and a statistics line per answer.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rustyline::error::ReadlineError;
use rustyline::{Config, DefaultEditor};

use crate::chat::{Chat, Turn};
use crate::cli::{ChatArgs, RunArgs};
use crate::loader::{self, LoadedModel};
use crate::session::FinishReason;
use crate::settings::Settings;
use crate::template::Message;
use crate::tools::ToolChoice;

const HELP: &str = "\
Commands:
  /help                 this list
  /system [TEXT]        set the system prompt, or show it
  /clear                start a new conversation (the system prompt stays)
  /regen                drop the last answer and generate it again
  /undo                 drop the last exchange
  /set PARAM VALUE      change a setting; /set alone lists them
  /show                 the model, the settings and the context in use
  /save FILE            save the conversation as JSON chat messages
  /load FILE            load a conversation saved with /save
  /tools [FILE|off]     tools the model may call (a JSON list of function definitions), or list them
  /tool-choice CHOICE   auto (the model decides), required, none, or a function's name
                        (a forced choice applies to answers to your messages; after tool
                        results the model decides)
  /tool-result TEXT     answer the model's tool call with TEXT (the model goes on when all are answered)
  /verbose              statistics after each answer on or off
  /bye, /exit           quit (also Ctrl+D)
Messages over several lines: start and end them with \"\"\", or paste them.
Ctrl+C stops an answer; the session goes on.";

const COMMANDS: &[&str] = &[
    "/help",
    "/system",
    "/clear",
    "/regen",
    "/undo",
    "/set",
    "/show",
    "/save",
    "/load",
    "/tools",
    "/tool-choice",
    "/tool-result",
    "/verbose",
    "/bye",
    "/exit",
];

/// `zagreus chat`, or `zagreus` with no prompt on a terminal.
pub fn run(args: ChatArgs) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        // Scripts never hang at a prompt: piped input is one request, as in the pipe mode.
        return crate::oneshot::run(RunArgs {
            prompt: Vec::new(),
            system: args.system,
            raw: false,
            json: false,
            logprobs: None,
            verbose: args.verbose,
            verbose_prompt: false,
            shape: crate::cli::ShapeArgs {
                tools: args.tools.clone(),
                ..Default::default()
            },
            model: args.model,
            sampling: args.sampling,
        });
    }
    let (loaded, threads) = loader::load_for(&args.model.spec())?;
    if loaded.lacks_chat_format() {
        crate::note!("zagreus: warning: the model has no chat template and no ChatML tokens (a base model?); answers may be poor");
    }
    let settings = Settings::resolve(&args.sampling.request(), &loaded.generation)?;
    let context = loader::context_size(&args.model.spec(), &loaded.model)?;
    let mut chat = Chat::new(&loaded, context, args.system.clone(), settings, !args.model.no_bos);
    if let Some(path) = &args.tools {
        chat.set_tools(crate::cli::read_tools(path)?)?;
    }
    let history = history_path(args.no_history);
    let mut repl = Repl::new(chat, args.verbose, history)?;
    crate::note!(
        "zagreus {}: {}. /help for commands, /bye or Ctrl+D to quit.",
        env!("CARGO_PKG_VERSION"),
        loaded.describe(threads)
    );
    repl.run()
}

/// Where input history lives: ZAGREUS_HISTORY_FILE, else the platform data directory.
fn history_path(disabled: bool) -> Option<PathBuf> {
    let off = std::env::var("ZAGREUS_NO_HISTORY").is_ok_and(|v| !v.is_empty() && v != "0");
    if disabled || off {
        return None;
    }
    if let Some(p) = std::env::var_os("ZAGREUS_HISTORY_FILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    data_dir().map(|d| d.join("zagreus").join("history.txt"))
}

fn data_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    if cfg!(target_os = "macos") {
        return home.map(|h| h.join("Library/Application Support"));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x));
    }
    home.map(|h| h.join(".local/share"))
}

struct Repl<'m> {
    chat: Chat<'m>,
    editor: DefaultEditor,
    history: Option<PathBuf>,
    verbose: bool,
    /// Dim statistics, only when both streams are terminals and NO_COLOR is unset.
    color: bool,
}

enum Input {
    Line(String),
    /// Ctrl+C at the prompt.
    Interrupted,
    /// Ctrl+D.
    Eof,
}

impl<'m> Repl<'m> {
    fn new(chat: Chat<'m>, verbose: bool, history: Option<PathBuf>) -> Result<Self> {
        let config = Config::builder()
            .auto_add_history(false)
            .bracketed_paste(true)
            .max_history_size(10_000)?
            .build();
        let mut editor = DefaultEditor::with_config(config).context("cannot set up the terminal")?;
        let mut history = history;
        if let Some(h) = history
            .as_ref()
            .filter(|h| std::fs::metadata(h).is_ok_and(|m| !m.is_file()))
        {
            crate::note!(
                "zagreus: warning: the history {} is not a regular file; history is off",
                h.display()
            );
            history = None;
        }
        if let Some(h) = &history {
            match editor.load_history(h) {
                Ok(()) => {}
                Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => crate::note!("zagreus: warning: cannot read the history {}: {e}", h.display()),
            }
        }
        let color = std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal()
            && std::env::var_os("NO_COLOR").is_none();
        Ok(Self {
            chat,
            editor,
            history,
            verbose,
            color,
        })
    }

    fn read(&mut self, prompt: &str) -> Result<Input> {
        match self.editor.readline(prompt) {
            Ok(line) => Ok(Input::Line(line)),
            Err(ReadlineError::Interrupted) => Ok(Input::Interrupted),
            Err(ReadlineError::Eof) => Ok(Input::Eof),
            Err(e) => Err(anyhow!("cannot read the terminal: {e}")),
        }
    }

    /// One message: a line, or a `"""` block over several lines. None at Ctrl+D.
    fn read_message(&mut self) -> Result<Option<String>> {
        loop {
            let line = match self.read(">>> ")? {
                Input::Line(l) => l,
                Input::Interrupted => {
                    crate::note!("(Ctrl+D or /bye to quit)");
                    continue;
                }
                Input::Eof => return Ok(None),
            };
            let Some(first) = line.trim_start().strip_prefix("\"\"\"") else {
                return Ok(Some(line));
            };
            if let Some(one) = first.strip_suffix("\"\"\"") {
                return Ok(Some(one.to_string()));
            }
            let mut parts: Vec<String> = if first.is_empty() {
                Vec::new()
            } else {
                vec![first.to_string()]
            };
            // Ctrl+C or Ctrl+D abandon the block.
            while let Input::Line(l) = self.read("... ")? {
                match l.strip_suffix("\"\"\"") {
                    Some(last) => {
                        if !last.is_empty() || parts.is_empty() {
                            parts.push(last.to_string());
                        }
                        return Ok(Some(parts.join("\n")));
                    }
                    None => parts.push(l),
                }
            }
        }
    }

    fn remember(&mut self, entry: &str) {
        if entry.trim().is_empty() {
            return;
        }
        let _ = self.editor.add_history_entry(entry);
        if let Some(h) = &self.history {
            if let Some(dir) = h.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = self.editor.append_history(h) {
                crate::note!("zagreus: warning: cannot write the history {}: {e}", h.display());
                self.history = None;
            }
        }
    }

    fn run(&mut self) -> Result<()> {
        while let Some(text) = self.read_message()? {
            let trimmed = text.trim();
            if trimmed.is_empty() {
                continue;
            }
            self.remember(&text);
            let result = if trimmed.starts_with('/') {
                match self.command(trimmed) {
                    Ok(Flow::Quit) => return Ok(()),
                    Ok(Flow::Continue) => Ok(()),
                    Err(e) => Err(e),
                }
            } else {
                let mut out = std::io::stdout();
                let turn = self.chat.send(&text, &mut |piece| {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                    Ok(())
                });
                turn.map(|t| self.after_answer(&t))
            };
            if let Err(e) = result {
                if is_broken_pipe(&e) {
                    return Err(e);
                }
                crate::note!("zagreus: error: {}", one_line(&e));
            }
        }
        Ok(())
    }

    fn after_answer(&mut self, turn: &Turn) {
        let c = &turn.completion;
        let mut out = std::io::stdout();
        if !turn.shown.is_empty() && !turn.shown.ends_with('\n') {
            let _ = writeln!(out);
        }
        for call in &turn.calls {
            let _ = writeln!(out, "→ tool call {} {}  [{}]", call.name, call.arguments, call.id);
        }
        let _ = out.flush();
        if !turn.calls.is_empty() {
            self.note("answer with /tool-result TEXT");
        }
        if turn.dropped > 0 {
            self.note(&format!(
                "the conversation did not fit the context of {} tokens: dropped the {} oldest exchange{}",
                self.chat.context_size(),
                turn.dropped,
                if turn.dropped == 1 { "" } else { "s" }
            ));
        }
        match c.finish {
            FinishReason::Cancelled => self.note("answer interrupted (kept in the conversation; /regen to redo it)"),
            FinishReason::Length if c.stats.context_full => {
                self.note("the context is full: the answer was cut short (/clear starts over)")
            }
            FinishReason::Length => self.note(&format!("stopped at {} tokens (/set max_tokens N)", c.tokens.len())),
            _ => {}
        }
        if self.verbose {
            let s = &c.stats;
            let line = format!(
                "time to first token {:.2} s · prompt {} tokens, {} new, {:.1} t/s · answer {} tokens, {:.1} t/s · context {}/{}",
                s.time_to_first_token.as_secs_f64(),
                s.prompt_tokens,
                s.prompt_processed,
                s.prompt_tps(),
                s.generated,
                s.decode_tps(),
                self.chat.context_used(),
                self.chat.context_size()
            );
            self.note(&line);
        }
    }

    fn note(&self, text: &str) {
        if self.color {
            crate::note!("\x1b[2m{text}\x1b[0m");
        } else {
            crate::note!("{text}");
        }
    }

    fn command(&mut self, line: &str) -> Result<Flow> {
        let (cmd, arg) = match line.split_once(char::is_whitespace) {
            Some((c, a)) => (c, a.trim()),
            None => (line, ""),
        };
        let mut out = std::io::stdout();
        match cmd {
            "/bye" | "/exit" | "/quit" => return Ok(Flow::Quit),
            "/help" | "/?" => writeln!(out, "{HELP}")?,
            "/system" => {
                if arg.is_empty() {
                    match self.chat.system() {
                        Some(s) => writeln!(out, "{s}")?,
                        None => writeln!(out, "(no system prompt)")?,
                    }
                } else {
                    self.chat.set_system(Some(arg.to_string()));
                    self.note("system prompt set");
                }
            }
            "/clear" => {
                self.chat.clear();
                self.note("new conversation");
            }
            "/undo" => {
                if self.chat.undo() {
                    self.note("dropped the last exchange");
                } else {
                    self.note("nothing to undo");
                }
            }
            "/regen" => {
                let turn = self.chat.regen(&mut |piece| {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                    Ok(())
                })?;
                self.after_answer(&turn);
            }
            "/set" => self.set(arg)?,
            "/show" => self.show()?,
            "/save" => {
                if arg.is_empty() {
                    bail!("/save needs a file name");
                }
                let json = serde_json::to_string_pretty(&self.chat.messages())?;
                write_atomically(Path::new(arg), format!("{json}\n").as_bytes())?;
                self.note(&format!("saved {} messages to {arg}", self.chat.messages().len()));
            }
            "/load" => {
                if arg.is_empty() {
                    bail!("/load needs a file name");
                }
                let text =
                    crate::bounded::read_text(Path::new(arg), crate::bounded::CONVERSATION_LIMIT, "the conversation")?;
                let messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
                    format!("{arg} is not a JSON list of chat messages ({{\"role\": ..., \"content\": ...}})")
                })?;
                let n = messages.len();
                self.chat.load(messages).with_context(|| format!("cannot load {arg}"))?;
                self.note(&format!("loaded {n} messages from {arg}"));
            }
            "/tools" => match arg {
                "" => {
                    if self.chat.tools().is_empty() {
                        writeln!(out, "(no tools)")?;
                    }
                    for t in self.chat.tools() {
                        writeln!(out, "{} {}", t.name, t.parameters)?;
                    }
                }
                "off" => {
                    self.chat.set_tools(Vec::new())?;
                    self.note("tools off");
                }
                path => {
                    let tools = crate::cli::read_tools(Path::new(path))?;
                    let n = tools.len();
                    self.chat.set_tools(tools)?;
                    self.note(&format!("{n} tool{} from {path}", if n == 1 { "" } else { "s" }));
                }
            },
            "/tool-choice" => {
                if arg.is_empty() {
                    writeln!(out, "{}", self.chat.tool_choice().name())?;
                } else {
                    if self.chat.tools().is_empty() {
                        bail!("/tool-choice: load tools first (/tools FILE)");
                    }
                    self.chat.set_tool_choice(ToolChoice::from_name(arg))?;
                    self.note(&format!("tool choice: {arg}"));
                }
            }
            "/tool-result" => {
                if arg.is_empty() {
                    bail!("/tool-result needs the tool's result as text");
                }
                let turn = self.chat.tool_result(arg, &mut |piece| {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                    Ok(())
                })?;
                match turn {
                    Some(turn) => self.after_answer(&turn),
                    None => self.note(&format!("{} more call(s) to answer", self.chat.pending_calls().len())),
                }
            }
            "/verbose" => {
                self.verbose = !self.verbose;
                self.note(if self.verbose {
                    "statistics on"
                } else {
                    "statistics off"
                });
            }
            other => {
                let hint = closest_command(other)
                    .map(|c| format!("; did you mean {c}?"))
                    .unwrap_or_default();
                bail!("unknown command {other}{hint} (/help lists them)");
            }
        }
        Ok(Flow::Continue)
    }

    fn set(&mut self, arg: &str) -> Result<()> {
        let mut s = self.chat.settings().clone();
        if arg.is_empty() {
            let mut out = std::io::stdout();
            writeln!(out, "{}", settings_text(&s))?;
            return Ok(());
        }
        let (name, value) = arg
            .split_once(char::is_whitespace)
            .map(|(n, v)| (n, v.trim()))
            .unwrap_or((arg, ""));
        let name = name.replace('-', "_");
        if value.is_empty() && name != "stop" {
            bail!("/set {name} needs a value");
        }
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| anyhow!("/set {name}: `{v}` is not a number"))
        };
        let int = |v: &str| {
            v.parse::<i64>()
                .map_err(|_| anyhow!("/set {name}: `{v}` is not a whole number"))
        };
        let count = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| anyhow!("/set {name}: `{v}` is not a count"))
        };
        match name.as_str() {
            "temperature" | "temp" => s.sampling.temperature = num(value)?,
            "top_k" => s.sampling.top_k = count(value)?,
            "top_p" => s.sampling.top_p = num(value)?,
            "min_p" => s.sampling.min_p = num(value)?,
            "repeat_penalty" => s.sampling.repeat_penalty = num(value)?,
            "repeat_last_n" => s.sampling.repeat_last_n = int(value)?,
            "presence_penalty" => s.sampling.presence_penalty = num(value)?,
            "frequency_penalty" => s.sampling.frequency_penalty = num(value)?,
            "seed" => s.sampling.seed = value.parse().map_err(|_| anyhow!("/set seed: `{value}` is not a whole number"))?,
            "max_tokens" | "n" => s.max_tokens = count(value)?,
            "stop" => {
                s.stop = if value.is_empty() || value == "none" { Vec::new() } else { vec![unescape(value)] };
            }
            "ignore_eos" => s.ignore_eos = matches!(value, "1" | "true" | "on" | "yes"),
            "system" => {
                self.chat.set_system(Some(value.to_string()));
                self.note("system prompt set");
                return Ok(());
            }
            other => bail!(
                "/set: unknown setting `{other}` (temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, seed, max_tokens, stop, ignore_eos, system)"
            ),
        }
        self.chat
            .set_settings(s)
            .map_err(|e| anyhow!("/set {name}: {}", e.to_string().trim_start_matches("--")))?;
        self.note(&format!("{name} set to {value}"));
        Ok(())
    }

    fn show(&self) -> Result<()> {
        let lm: &LoadedModel = self.chat.model();
        let cfg = lm.model.config();
        let mut out = std::io::stdout();
        writeln!(out, "model        {}", lm.name)?;
        writeln!(
            out,
            "shape        {} layers, hidden {}, {} heads / {} KV heads, vocab {}, {:.0}M parameters",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            lm.model.vocab_size(),
            cfg.parameter_count() as f64 / 1e6
        )?;
        writeln!(
            out,
            "runs on      {}, {}",
            crate::device::device_name(&lm.model.device()),
            lm.model.precision()
        )?;
        writeln!(
            out,
            "template     {}",
            if lm.has_template {
                lm.template.origin()
            } else {
                "built-in ChatML"
            }
        )?;
        writeln!(out, "system       {}", self.chat.system().unwrap_or("(none)"))?;
        writeln!(out, "messages     {}", self.chat.messages().len())?;
        writeln!(
            out,
            "context      {} used / {} available",
            self.chat.context_used(),
            self.chat.context_size()
        )?;
        writeln!(out, "statistics   {}", if self.verbose { "on" } else { "off" })?;
        writeln!(out, "{}", settings_text(self.chat.settings()))?;
        Ok(())
    }
}

enum Flow {
    Continue,
    Quit,
}

fn settings_text(s: &Settings) -> String {
    let p = &s.sampling;
    format!(
        "settings     temperature {} · top_k {} · top_p {} · min_p {} · repeat_penalty {} · repeat_last_n {} · presence_penalty {} · frequency_penalty {} · seed {} · max_tokens {} · stop {:?} · ignore_eos {}",
        p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n, p.presence_penalty, p.frequency_penalty, p.seed, s.max_tokens, s.stop, s.ignore_eos
    )
}

/// `\n` and `\t` typed in a /set value.
fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

/// The command closest to a mistyped one (edit distance at most 2).
fn closest_command(cmd: &str) -> Option<&'static str> {
    COMMANDS
        .iter()
        .map(|c| (edit_distance(cmd, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Writes a file via a temporary sibling and a rename, so no partial file is ever left.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistyped_commands_get_a_hint() {
        assert_eq!(closest_command("/regn"), Some("/regen"));
        assert_eq!(closest_command("/sytem"), Some("/system"));
        assert_eq!(closest_command("/frobnicate"), None);
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        write_atomically(&p, b"[]").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"[]");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_atomically(&dir.path().join("missing/c.json"), b"[]").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
