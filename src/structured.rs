//! Constrained decoding: a JSON schema, "any JSON object" or the Hermes tool-call syntax becomes a
//! token mask applied before sampling, so that the answer always parses (and validates).
//!
//! The grammar engine is llguidance (the one llama.cpp and vLLM use): it computes the set of
//! allowed tokens over the whole vocabulary in tens of microseconds from a token trie, supports
//! JSON schemas (with `$ref`, `anyOf`, bounds) and Lark grammars that embed them. Its own
//! Hugging Face bridge pins an older `tokenizers`, so the token bytes come from our tokenizer's
//! JSON through llguidance's `token_bytes_from_tokenizer_json` and the trie is built here.
//!
//! A [`Plan`] is what a request asks for, compiled and checked once; each sequence gets its own
//! [`Constraint`] from it. Tool calls with `tool_choice: auto` use a lazy grammar: the text is
//! free until the model writes `<tool_call>`, then the call is constrained to the tools' schemas.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tools::{ToolChoice, ToolDef, CALL_CLOSE, CALL_OPEN};

/// The vocabulary as llguidance sees it, built once per model (building the trie and the
/// mask slices of a 128k vocabulary takes a fraction of a second).
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// `<tool_call>` / `</tool_call>` as special tokens, when the vocabulary has them.
    open_token: Option<u32>,
    close_token: Option<u32>,
}

struct Env {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => crate::budget::catch_panic(|| self.tokenizer.encode_fast(text, false))
                .ok()
                .and_then(|r| r.ok())
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_else(|| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl Grammars {
    /// The grammar engine for a tokenizer and a model whose logits have `vocab` entries;
    /// `stop_ids` end a finished answer.
    pub fn new(tokenizer: Arc<tokenizers::Tokenizer>, vocab: usize, stop_ids: &BTreeSet<u32>) -> Result<Self> {
        let unsupported = |why: String| anyhow!("structured output is not available for this tokenizer: {why}");
        let json: Value = tokenizer
            .to_string(false)
            .map_err(|e| unsupported(e.to_string()))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| unsupported(e.to_string())))?;
        let mut words = crate::budget::catch_panic(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|p| unsupported(p.to_string()))?
            .map_err(|e| unsupported(e.to_string()))?;
        let size = vocab.max(words.len());
        words.resize(size, Vec::new());
        let first_stop = *stop_ids
            .iter()
            .next()
            .context("structured output needs an end-of-generation token, and this model has none")?;
        let info = TokRxInfo::new(size as u32, first_stop);
        let stops: Vec<u32> = stop_ids.iter().copied().collect();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
        let special = |text: &str| {
            let marked: Vec<u8> = std::iter::once(TokTrie::SPECIAL_TOKEN_MARKER)
                .chain(text.bytes())
                .collect();
            words.iter().position(|w| *w == marked).map(|i| i as u32)
        };
        let (open_token, close_token) = (special(CALL_OPEN), special(CALL_CLOSE));
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| unsupported(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            open_token,
            close_token,
        })
    }

    fn trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }

    /// A tag in a Lark grammar: the special token when the vocabulary has one, else the text.
    fn tag(&self, text: &str, special: Option<u32>) -> String {
        match special {
            Some(id) => format!("<[{id}]>"),
            None => serde_json::to_string(text).expect("a string serializes"),
        }
    }

    /// Compiles what a request asks for; the error names what is wrong with the schema.
    pub fn plan(self: &Arc<Self>, structure: &Structure) -> Result<Arc<Plan>> {
        let mode = match structure {
            Structure::Json(schema) => Mode::Forced(TopLevelGrammar::from_json_schema(json_options(schema.clone())?)),
            Structure::Tools {
                tools,
                choice,
                parallel,
            } => {
                let chosen: Vec<&ToolDef> = match choice {
                    ToolChoice::None => bail!("internal error: no grammar for tool_choice none"),
                    ToolChoice::Named(name) => vec![tools.iter().find(|t| &t.name == name).ok_or_else(|| {
                        anyhow!("tool_choice names the function `{name}`, which is not among the tools")
                    })?],
                    ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
                };
                let alternatives = chosen
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("f{i}: %json {}\n", call_schema(t)))
                    .collect::<String>();
                let names = (0..chosen.len())
                    .map(|i| format!("f{i}"))
                    .collect::<Vec<_>>()
                    .join(" | ");
                let open = self.tag(CALL_OPEN, self.open_token);
                let close = self.tag(CALL_CLOSE, self.close_token);
                if *choice == ToolChoice::Auto {
                    // After `<tool_call>`: the call, then `</tool_call>`; newlines around it as
                    // the Hermes format writes them (optional, the trigger may have taken one).
                    let body = format!("start: NL? ({names}) NL? {close}\nNL: \"\\n\"\n{alternatives}");
                    Mode::Lazy {
                        body: TopLevelGrammar::from_lark(body),
                        parallel: *parallel,
                    }
                } else {
                    let repeat = if *parallel { " (\"\\n\" call)*" } else { "" };
                    let lark =
                        format!("start: call{repeat}\ncall: {open} \"\\n\" ({names}) \"\\n\" {close}\n{alternatives}");
                    Mode::Forced(TopLevelGrammar::from_lark(lark))
                }
            }
        };
        let plan = Arc::new(Plan {
            grammars: self.clone(),
            mode,
        });
        // Compile once now, so that a bad schema is a clear error before anything runs.
        let grammar = match &plan.mode {
            Mode::Forced(g) => g,
            Mode::Lazy { body, .. } => body,
        };
        plan.matcher(grammar)?;
        Ok(plan)
    }
}

/// The JSON style of constrained answers: Python's `json.dumps` separators (`", "`, `": "`), no
/// other whitespace (a small model given free whitespace may never stop writing it).
fn json_options(mut schema: Value) -> Result<Value> {
    let Value::Object(map) = &mut schema else {
        if schema == Value::Bool(true) {
            return json_options(json!({}));
        }
        bail!("the JSON schema must be an object, not {schema}");
    };
    let style =
        json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false, "coerce_one_of": true});
    match map.get_mut("x-guidance") {
        Some(Value::Object(given)) => {
            for (k, v) in style.as_object().expect("an object") {
                given.entry(k.clone()).or_insert(v.clone());
            }
        }
        _ => {
            map.insert("x-guidance".into(), style);
        }
    }
    Ok(schema)
}

/// The schema of one Hermes call: `{"name": <the tool>, "arguments": <its parameters>}`. The
/// parameters' definitions move to the wrapper's root and their references are rewritten, so
/// `$ref`s (`#/$defs/X`, `#`, `#/properties/...`) resolve as they did in the parameters alone.
/// Keywords the engine does not implement are ignored rather than refused (a tool's call must
/// not fail over `uniqueItems`).
fn call_schema(tool: &ToolDef) -> Value {
    const AT: &str = "#/properties/arguments";
    let mut params = match &tool.parameters {
        Value::Object(m) if !m.is_empty() => tool.parameters.clone(),
        _ => json!({"type": "object"}),
    };
    let mut root = serde_json::Map::new();
    if let Value::Object(m) = &mut params {
        for key in ["$defs", "definitions"] {
            if let Some(defs) = m.remove(key) {
                root.insert(key.to_string(), defs);
            }
        }
    }
    fn rewrite(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    match x {
                        Value::String(r) if k == "$ref" => {
                            let defs = r.starts_with("#/$defs/") || r.starts_with("#/definitions/");
                            if r == "#" {
                                *r = AT.to_string();
                            } else if r.starts_with("#/") && !defs {
                                *r = format!("{AT}{}", &r[1..]);
                            }
                        }
                        _ => rewrite(x),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(rewrite),
            _ => {}
        }
    }
    rewrite(&mut params);
    for defs in root.values_mut() {
        rewrite(defs);
    }
    root.insert("type".into(), json!("object"));
    root.insert(
        "properties".into(),
        json!({"name": {"const": tool.name}, "arguments": params}),
    );
    root.insert("required".into(), json!(["name", "arguments"]));
    root.insert("additionalProperties".into(), json!(false));
    root.insert("x-guidance".into(), json!({"lenient": true}));
    json_options(Value::Object(root)).expect("an object schema")
}

/// What a request asks of the answer's shape: tools it may (or must) call, or a JSON schema.
/// Flags, a JSON request line and an HTTP body fill the same struct.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AnswerShape {
    pub tools: Vec<ToolDef>,
    pub tool_choice: ToolChoice,
    /// Several calls in one answer.
    pub parallel_tool_calls: bool,
    /// The answer is JSON valid against this schema (`{"type": "object"}`: any JSON object).
    pub json_schema: Option<Value>,
}

impl AnswerShape {
    /// Tools, with `tool_choice` (default: auto with tools, none without); the choice is
    /// checked against the tools.
    pub fn new(
        tools: Vec<ToolDef>,
        tool_choice: Option<ToolChoice>,
        parallel: bool,
        json_schema: Option<Value>,
    ) -> Result<Self> {
        let tool_choice = tool_choice.unwrap_or(if tools.is_empty() {
            ToolChoice::None
        } else {
            ToolChoice::Auto
        });
        if tools.is_empty() && tool_choice != ToolChoice::None {
            bail!("tool_choice asks for a tool call, but no tools are given");
        }
        if let ToolChoice::Named(name) = &tool_choice {
            if !tools.iter().any(|t| &t.name == name) {
                bail!("tool_choice names the function `{name}`, which is not among the tools");
            }
        }
        if json_schema.is_some() && !tools.is_empty() && tool_choice.parses_calls() {
            bail!("a JSON schema for the answer and tool calls exclude each other (with tools, use tool_choice none)");
        }
        Ok(Self {
            tools,
            tool_choice,
            parallel_tool_calls: parallel,
            json_schema,
        })
    }

    /// Whether answers are split into content and tool calls.
    pub fn parses_calls(&self) -> bool {
        !self.tools.is_empty() && self.tool_choice.parses_calls()
    }

    /// The constraint to decode under: tool calls (forced, or lazy with `auto`), else the schema.
    pub fn structure(&self) -> Option<Structure> {
        if self.parses_calls() {
            return Some(Structure::Tools {
                tools: self.tools.clone(),
                choice: self.tool_choice.clone(),
                parallel: self.parallel_tool_calls,
            });
        }
        self.json_schema.clone().map(Structure::Json)
    }
}

/// What shape the answer must have.
#[derive(Debug, Clone, PartialEq)]
pub enum Structure {
    /// JSON valid against this schema (`{"type": "object"}` for "any JSON object").
    Json(Value),
    /// Hermes tool calls to these tools.
    Tools {
        tools: Vec<ToolDef>,
        choice: ToolChoice,
        parallel: bool,
    },
}

enum Mode {
    /// The grammar holds from the first token.
    Forced(TopLevelGrammar),
    /// Free text until `<tool_call>`, then `body`; with `parallel`, free again after each call.
    Lazy { body: TopLevelGrammar, parallel: bool },
}

/// A compiled request for structure, shared by the sequences that use it.
pub struct Plan {
    grammars: Arc<Grammars>,
    mode: Mode,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.mode {
            Mode::Forced(_) => "Plan(forced)",
            Mode::Lazy { .. } => "Plan(lazy)",
        })
    }
}

impl Plan {
    fn matcher(&self, grammar: &TopLevelGrammar) -> Result<Matcher> {
        let parser = self.grammars.factory.create_parser(grammar.clone());
        let m = Matcher::new(parser);
        if let Some(e) = m.get_error() {
            bail!("the grammar does not compile: {e}");
        }
        Ok(m)
    }

    /// A sequence's constraint. (The grammar compiled when the plan was made; should it fail
    /// now, the first mask reports it.)
    pub fn start(self: &Arc<Self>) -> Constraint {
        let state = match &self.mode {
            Mode::Forced(g) => State::Grammar(Box::new(Matcher::new(self.grammars.factory.create_parser(g.clone())))),
            Mode::Lazy { .. } => State::Free,
        };
        Constraint {
            plan: self.clone(),
            state,
            recent: Vec::new(),
            calls: 0,
        }
    }
}

enum State {
    /// No constraint (before a lazy grammar's trigger).
    Free,
    Grammar(Box<Matcher>),
    /// Only an end-of-generation token may come.
    End,
}

/// One sequence's constraint: masks logits, follows the sampled tokens.
pub struct Constraint {
    plan: Arc<Plan>,
    state: State,
    /// Bytes generated since the last call ended, where the lazy trigger is looked for.
    recent: Vec<u8>,
    calls: usize,
}

impl Constraint {
    fn trie(&self) -> &TokTrie {
        self.plan.grammars.trie()
    }

    /// Sets the logits of tokens the grammar does not allow to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = match &mut self.state {
            State::Free => return Ok(()),
            State::Grammar(m) => m
                .compute_mask_or_eos()
                .map_err(|e| anyhow!("constrained decoding failed: {e}"))?,
            State::End => self.trie().eos_token_set(),
        };
        let words = allowed.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    /// Whether a grammar holds now (not the free text before a lazy grammar's trigger).
    pub fn binds(&self) -> bool {
        !matches!(self.state, State::Free)
    }

    /// Whether the grammar is finished: only an end-of-generation token may follow.
    pub fn is_done(&self) -> bool {
        match &self.state {
            State::End => true,
            State::Grammar(m) => m.is_stopped(),
            State::Free => false,
        }
    }

    /// Follows a sampled token (not an end-of-generation one).
    pub fn accept(&mut self, token: u32) -> Result<()> {
        match &mut self.state {
            State::End => Ok(()),
            State::Grammar(m) => {
                m.consume_token(token)
                    .map_err(|e| anyhow!("constrained decoding failed: {e}"))?;
                if matches!(self.plan.mode, Mode::Lazy { .. }) && m.is_accepting().unwrap_or(false) {
                    self.end_call();
                }
                Ok(())
            }
            State::Free => {
                let bytes = self.trie().token(token).to_vec();
                self.recent.extend_from_slice(&bytes);
                if let Some(at) = find(&self.recent, CALL_OPEN.as_bytes()) {
                    let rest = self.recent[at + CALL_OPEN.len()..].to_vec();
                    self.recent.clear();
                    self.start_call(&rest)?;
                } else {
                    // Keep only a tail that may still grow into the trigger.
                    let keep = self.recent.len().saturating_sub(CALL_OPEN.len() + 1);
                    self.recent.drain(..keep);
                }
                Ok(())
            }
        }
    }

    /// The model opened a call: constrain it from here. Bytes of the trigger's token after
    /// `<tool_call>` are fed to the grammar; if it refuses them, this call stays free (and is
    /// reported as text if it does not parse).
    fn start_call(&mut self, rest: &[u8]) -> Result<()> {
        let Mode::Lazy { body, .. } = &self.plan.mode else {
            return Ok(());
        };
        let mut m = self.plan.matcher(body)?;
        let ids = self.trie().greedy_tokenize(rest);
        if m.consume_tokens(&ids).is_ok() {
            self.state = State::Grammar(Box::new(m));
        }
        Ok(())
    }

    fn end_call(&mut self) {
        self.calls += 1;
        let parallel = matches!(self.plan.mode, Mode::Lazy { parallel: true, .. });
        self.state = if parallel { State::Free } else { State::End };
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
