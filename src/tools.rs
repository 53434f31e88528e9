//! Tool calls in the Hermes / Qwen2.5 convention the Nesso models use: tools are given as
//! OpenAI-style definitions (rendered by the chat template), the model answers
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, and the answer is split back
//! into content and structured calls, whole or as it streams.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use sha1::{Digest, Sha1};

pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// One tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    /// The JSON schema of its arguments (`{}` when the definition gives none).
    pub parameters: Value,
    /// The definition in OpenAI's shape (`{"type": "function", "function": {...}}`), as the
    /// template receives it.
    pub definition: Value,
}

/// Reads a list of OpenAI-style tool definitions (`{"type": "function", "function": {"name",
/// "description", "parameters"}}`; a bare `{"name", ...}` function is accepted too).
pub fn parse_tools(v: &Value) -> Result<Vec<ToolDef>> {
    let Some(list) = v.as_array() else {
        bail!("tools must be a JSON list of tool definitions");
    };
    let mut out: Vec<ToolDef> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        // The template gets the definition as given (as transformers passes a dict), a bare
        // function wrapped in OpenAI's shape.
        let (function, definition) = match t.get("function") {
            Some(f) => {
                if let Some(kind) = t.get("type").and_then(Value::as_str) {
                    if kind != "function" {
                        bail!("tools[{i}] is of type {kind:?}: only \"function\" tools are supported");
                    }
                }
                (f, t.clone())
            }
            None => (t, json!({"type": "function", "function": t})),
        };
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .with_context(|| format!("tools[{i}] has no function name"))?;
        if out.iter().any(|d| d.name == name) {
            bail!("tools[{i}]: the function name {name:?} is given twice");
        }
        let parameters = function.get("parameters").cloned().unwrap_or_else(|| json!({}));
        if !parameters.is_object() {
            bail!("tools[{i}] ({name}): `parameters` must be a JSON schema object");
        }
        out.push(ToolDef {
            name: name.to_string(),
            parameters,
            definition,
        });
    }
    Ok(out)
}

/// The definitions as the chat template receives them (`tools=[...]` in transformers).
pub fn template_values(tools: &[ToolDef]) -> Vec<Value> {
    tools.iter().map(|t| t.definition.clone()).collect()
}

/// Whether and how the model must call a tool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// No calls: the answer is text (the tools are still shown to the model).
    None,
    /// The model decides; a call it opens is constrained to the tools' schemas.
    #[default]
    Auto,
    /// At least one call, from the first token.
    Required,
    /// A call of this function, from the first token.
    Named(String),
}

impl ToolChoice {
    /// `none`, `auto`, `required` or a function's name.
    pub fn from_name(s: &str) -> Self {
        match s {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            name => ToolChoice::Named(name.to_string()),
        }
    }

    /// OpenAI's `tool_choice`: a string, or `{"type": "function", "function": {"name": ...}}`.
    pub fn from_json(v: &Value) -> Result<Self> {
        match v {
            Value::String(s) if ["none", "auto", "required"].contains(&s.as_str()) => Ok(Self::from_name(s)),
            Value::Object(o) => o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(|n| ToolChoice::Named(n.to_string()))
                .context("tool_choice: an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}"),
            _ => bail!("tool_choice {v}: use \"none\", \"auto\", \"required\" or a function object"),
        }
    }

    /// The name `from_name` reads back.
    pub fn name(&self) -> &str {
        match self {
            ToolChoice::None => "none",
            ToolChoice::Auto => "auto",
            ToolChoice::Required => "required",
            ToolChoice::Named(n) => n,
        }
    }

    /// Whether the answer is searched for calls.
    pub fn parses_calls(&self) -> bool {
        *self != ToolChoice::None
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    /// `call_` and 24 hex digits, the same for the same answer (derived from `salt`, the call's
    /// position and its text).
    pub id: String,
    pub name: String,
    /// Always a JSON object.
    pub arguments: Value,
}

impl ToolCall {
    /// OpenAI's shape: arguments as a JSON string.
    pub fn to_openai(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments.to_string()},
        })
    }

    /// The call as an assistant message's `tool_calls` entry for the chat template (arguments
    /// as an object, as transformers' documentation writes them).
    pub fn to_message(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// What a [`CallSplitter`] found in the text.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text that is not part of a call.
    Content(String),
    /// A complete, well-formed call.
    Call(ToolCall),
}

/// Splits an answer into content and calls as it streams: text that could be the start of
/// `<tool_call>` is held back, a call is held until `</tool_call>` closes it, and a call that
/// does not parse comes out as content (never lost). The content comes out trimmed, as the whole
/// answer's: whitespace at the start is dropped, whitespace is held until more text follows it.
pub struct CallSplitter {
    salt: String,
    held: String,
    in_call: bool,
    calls: usize,
    /// Some content has come out.
    started: bool,
    /// Whitespace held back.
    space: String,
}

impl CallSplitter {
    pub fn new(salt: &str) -> Self {
        Self {
            salt: salt.to_string(),
            held: String::new(),
            in_call: false,
            calls: 0,
            started: false,
            space: String::new(),
        }
    }

    fn content(&mut self, out: &mut Vec<Piece>, text: &str) {
        let text = if self.started { text } else { text.trim_start() };
        let core = text.trim_end().len();
        if core == 0 {
            if self.started {
                self.space.push_str(text);
            }
            return;
        }
        self.started = true;
        let mut piece = std::mem::take(&mut self.space);
        piece.push_str(&text[..core]);
        self.space.push_str(&text[core..]);
        match out.last_mut() {
            Some(Piece::Content(c)) => c.push_str(&piece),
            _ => out.push(Piece::Content(piece)),
        }
    }

    /// A call block, or the text of one that does not parse.
    fn block(&mut self, out: &mut Vec<Piece>, block: &str) {
        match self.call(block) {
            Piece::Content(text) => self.content(out, &text),
            call => out.push(call),
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.call_end() else {
                    break;
                };
                let block: String = self.held.drain(..end).collect();
                self.in_call = false;
                self.block(&mut out, &block);
            } else if let Some(at) = self.held.find(CALL_OPEN) {
                let before: String = self.held.drain(..at).collect();
                self.content(&mut out, &before);
                self.in_call = true;
            } else {
                // Keep the longest tail that may grow into `<tool_call>`.
                let keep = (1..CALL_OPEN.len())
                    .rev()
                    .find(|&n| {
                        self.held.len() >= n
                            && self.held.is_char_boundary(self.held.len() - n)
                            && CALL_OPEN.starts_with(&self.held[self.held.len() - n..])
                    })
                    .unwrap_or(0);
                let emit: String = self.held.drain(..self.held.len() - keep).collect();
                self.content(&mut out, &emit);
                break;
            }
        }
        out
    }

    /// Where the held call ends: after the first `</tool_call>` whose JSON before it is not
    /// cut short (a closing tag inside an argument string does not end the call). `None`: wait
    /// for more text.
    fn call_end(&self) -> Option<usize> {
        let mut from = 0;
        while let Some(at) = self.held[from..].find(CALL_CLOSE) {
            let end = from + at + CALL_CLOSE.len();
            let inner = call_json(&self.held[..end]);
            match serde_json::from_str::<Value>(inner) {
                Err(e) if e.is_eof() => from = end,
                _ => return Some(end),
            }
        }
        None
    }

    /// The end of the answer: what is held comes out (an unclosed call as content, unless it
    /// parses without its closing tag).
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        if self.in_call {
            self.in_call = false;
            self.block(&mut out, &rest);
        } else {
            self.content(&mut out, &rest);
        }
        out
    }

    /// A call block (`<tool_call>` to `</tool_call>`, or to the end).
    fn call(&mut self, block: &str) -> Piece {
        let inner = call_json(block);
        let parsed = serde_json::from_str::<Value>(inner).ok().and_then(|v| {
            let name = v.get("name")?.as_str()?.to_string();
            let arguments = match v.get("arguments") {
                None | Some(Value::Null) => json!({}),
                Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok().filter(Value::is_object)?,
                Some(a @ Value::Object(_)) => a.clone(),
                Some(_) => return None,
            };
            Some((name, arguments))
        });
        match parsed {
            Some((name, arguments)) => {
                let mut h = Sha1::new();
                h.update(self.salt.as_bytes());
                h.update(self.calls.to_le_bytes());
                h.update(inner.as_bytes());
                let digest = h.finalize();
                let id = format!(
                    "call_{}",
                    digest[..12].iter().map(|b| format!("{b:02x}")).collect::<String>()
                );
                self.calls += 1;
                Piece::Call(ToolCall { id, name, arguments })
            }
            None => Piece::Content(block.to_string()),
        }
    }
}

/// The JSON of a call block: between the tags, trimmed.
fn call_json(block: &str) -> &str {
    let mut inner = block.strip_prefix(CALL_OPEN).unwrap_or(block).trim_end();
    if let Some(body) = inner.strip_suffix(CALL_CLOSE) {
        inner = body;
    }
    inner.trim()
}

/// A whole answer split into content and calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// The text outside the calls (trimmed; broken calls included as they were written).
    pub content: String,
    pub calls: Vec<ToolCall>,
}

pub fn parse_answer(text: &str, salt: &str) -> Parsed {
    let mut s = CallSplitter::new(salt);
    let mut pieces = s.push(text);
    pieces.extend(s.finish());
    let mut parsed = Parsed::default();
    for p in pieces {
        match p {
            Piece::Content(c) => parsed.content.push_str(&c),
            Piece::Call(c) => parsed.calls.push(c),
        }
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call_two_calls_text_then_a_call() {
        let one = parse_answer(
            "<tool_call>\n{\"name\": \"meteo\", \"arguments\": {\"citta\": \"Roma\"}}\n</tool_call>",
            "s",
        );
        assert_eq!(one.content, "");
        assert_eq!(one.calls.len(), 1);
        assert_eq!(one.calls[0].name, "meteo");
        assert_eq!(one.calls[0].arguments, json!({"citta": "Roma"}));
        assert!(one.calls[0].id.starts_with("call_") && one.calls[0].id.len() == 29);

        let two = parse_answer(
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>",
            "s",
        );
        assert_eq!(
            two.calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(two.calls[1].arguments, json!({"x": 1}));
        assert_ne!(two.calls[0].id, two.calls[1].id);
        assert_eq!(two.content, "");

        let text_then = parse_answer(
            "Controllo il meteo.\n<tool_call>\n{\"name\": \"meteo\", \"arguments\": {}}\n</tool_call>",
            "s",
        );
        assert_eq!(text_then.content, "Controllo il meteo.");
        assert_eq!(text_then.calls.len(), 1);
        // The same answer gets the same ids; another salt, others.
        assert_eq!(
            parse_answer("<tool_call>{\"name\": \"m\"}</tool_call>", "s").calls[0].id,
            parse_answer("<tool_call>{\"name\": \"m\"}</tool_call>", "s").calls[0].id
        );
        assert_ne!(
            parse_answer("<tool_call>{\"name\": \"m\"}</tool_call>", "s").calls[0].id,
            parse_answer("<tool_call>{\"name\": \"m\"}</tool_call>", "t").calls[0].id
        );
    }

    #[test]
    fn a_broken_call_is_reported_as_text() {
        let text = "Ecco: <tool_call>\n{\"name\": \"meteo\", \"arguments\": {\"citta\": \n</tool_call> fine";
        let p = parse_answer(text, "s");
        assert!(p.calls.is_empty());
        assert_eq!(p.content, text);
        // Unclosed, cut off: kept as text too.
        let cut = "<tool_call>\n{\"name\": \"meteo\", \"argu";
        assert_eq!(parse_answer(cut, "s").content, cut);
        // A closing tag inside an argument string does not end the call.
        let inside = parse_answer(
            "<tool_call>{\"name\": \"echo\", \"arguments\": {\"t\": \"a</tool_call>b\"}}</tool_call>",
            "s",
        );
        assert_eq!(inside.calls.len(), 1, "{inside:?}");
        assert_eq!(inside.calls[0].arguments, json!({"t": "a</tool_call>b"}));
        // Plain text is untouched, including a lone `<`.
        assert_eq!(parse_answer("a < b <tool", "s").content, "a < b <tool");
    }

    #[test]
    fn streamed_pieces_give_what_the_whole_text_gives() {
        let texts = [
            "Vediamo. <tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"è\"}}\n</tool_call>\n<tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>",
            "x <tool_call>{\"name\": \"e\", \"arguments\": {\"t\": \"</tool_call>\"}}</tool_call> y <tool_call>{\"name\": \"f\", \"a",
        ];
        for (text, step) in texts.iter().flat_map(|t| [1, 2, 3, 5, 7].map(|s| (*t, s))) {
            let whole = parse_answer(text, "z");
            let mut s = CallSplitter::new("z");
            let mut pieces = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(step) {
                pieces.extend(s.push(&chunk.iter().collect::<String>()));
            }
            pieces.extend(s.finish());
            let calls: Vec<ToolCall> = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Call(c) => Some(c.clone()),
                    _ => None,
                })
                .collect();
            assert_eq!(calls, whole.calls, "step {step}");
            let content: String = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Content(c) => Some(c.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(content, whole.content);
        }
        // Whitespace between a call and more text stays; at the ends it goes.
        assert_eq!(
            parse_answer(" A\n<tool_call>{\"name\": \"a\"}</tool_call>\nB \n", "z").content,
            "A\n\nB"
        );
    }

    #[test]
    fn tool_definitions_and_choices() {
        let tools = parse_tools(&json!([
            {"type": "function", "function": {"name": "meteo", "parameters": {"type": "object"}}},
            {"name": "ora"}
        ]))
        .unwrap();
        assert_eq!(
            tools[1].definition,
            json!({"type": "function", "function": {"name": "ora"}})
        );
        assert_eq!(tools[1].parameters, json!({}));
        for (bad, want) in [
            (json!({"name": "x"}), "list"),
            (json!([{"type": "function", "function": {}}]), "tools[0]"),
            (json!([{"name": "a"}, {"name": "a"}]), "twice"),
            (json!([{"type": "retrieval", "function": {"name": "a"}}]), "retrieval"),
        ] {
            let err = parse_tools(&bad).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        assert_eq!(ToolChoice::from_json(&json!("required")).unwrap(), ToolChoice::Required);
        assert_eq!(
            ToolChoice::from_json(&json!({"type": "function", "function": {"name": "meteo"}})).unwrap(),
            ToolChoice::Named("meteo".into())
        );
        assert!(ToolChoice::from_json(&json!("sometimes")).is_err());
        assert_eq!(ToolChoice::from_name("meteo"), ToolChoice::Named("meteo".into()));
    }
}
