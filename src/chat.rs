//! A conversation with a model: its messages and system prompt, rendered through the chat
//! template into a session whose KV cache keeps the common prefix across turns, fitted into the
//! context by dropping the oldest exchanges. The terminal UI is `repl.rs`; this part has none.

use std::sync::Arc;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::loader::LoadedModel;
use crate::sampling::Sampler;
use crate::session::{generate, Completion, FinishReason, GenerateOptions, Session};
use crate::settings::Settings;
use crate::structured::{AnswerShape, Plan};
use crate::template::Message;
use crate::tools::{CallSplitter, Piece, ToolCall, ToolChoice, ToolDef};

/// What one turn did.
pub struct Turn {
    pub completion: Completion,
    /// Oldest exchanges dropped to make the conversation fit the context.
    pub dropped: usize,
    /// Tool calls the answer made (its text outside them went to `on_text`).
    pub calls: Vec<ToolCall>,
    /// The text that went to `on_text`.
    pub shown: String,
}

pub struct Chat<'m> {
    lm: &'m LoadedModel,
    session: Session<'m>,
    system: Option<String>,
    /// Everything after the system prompt.
    messages: Vec<Message>,
    settings: Settings,
    sampler: Sampler,
    add_bos: bool,
    tools: Vec<ToolDef>,
    tool_choice: ToolChoice,
    /// Calls the model opens (or must make) follow the tools' schemas.
    constraint: Option<Arc<Plan>>,
    /// After tool results the model answers with `auto`, whatever the choice (a forced call
    /// there would call again and again).
    after_results: Option<Arc<Plan>>,
}

/// Marks an assistant message whose generation was interrupted.
pub const INTERRUPTED: &str = "interrupted";

impl<'m> Chat<'m> {
    pub fn new(lm: &'m LoadedModel, context: usize, system: Option<String>, settings: Settings, add_bos: bool) -> Self {
        let sampler = Sampler::new(settings.sampling.clone());
        Self {
            lm,
            session: Session::new(&lm.model, context),
            system,
            messages: Vec::new(),
            settings,
            sampler,
            add_bos,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            constraint: None,
            after_results: None,
        }
    }

    /// Tools the model may call from now on (none: no tools). The template must show them.
    pub fn set_tools(&mut self, tools: Vec<ToolDef>) -> Result<()> {
        let choice = match &self.tool_choice {
            ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => ToolChoice::Auto,
            c => c.clone(),
        };
        self.reshape(tools, choice)
    }

    /// How the next answers call tools: auto, required, none, or a named function.
    pub fn set_tool_choice(&mut self, choice: ToolChoice) -> Result<()> {
        self.reshape(self.tools.clone(), choice)
    }

    pub fn tool_choice(&self) -> &ToolChoice {
        &self.tool_choice
    }

    fn reshape(&mut self, tools: Vec<ToolDef>, choice: ToolChoice) -> Result<()> {
        if tools.is_empty() {
            self.tools.clear();
            self.constraint = None;
            self.after_results = None;
            self.tool_choice = ToolChoice::Auto;
            return Ok(());
        }
        let shape = AnswerShape::new(tools, Some(choice), true, None)?;
        self.constraint = self.lm.constraint_for(&shape)?;
        self.after_results = match shape.tool_choice {
            ToolChoice::Required | ToolChoice::Named(_) => {
                let auto = AnswerShape::new(shape.tools.clone(), Some(ToolChoice::Auto), true, None)?;
                self.lm.constraint_for(&auto)?
            }
            _ => self.constraint.clone(),
        };
        self.tools = shape.tools;
        self.tool_choice = shape.tool_choice;
        Ok(())
    }

    pub fn tools(&self) -> &[ToolDef] {
        &self.tools
    }

    /// The last answer's calls that no tool message answers yet.
    pub fn pending_calls(&self) -> Vec<Value> {
        let Some(at) = self.messages.iter().rposition(|m| m.role == "assistant") else {
            return Vec::new();
        };
        let answered = self.messages.len() - at - 1;
        if self.messages[at + 1..].iter().any(|m| m.role != "tool") {
            return Vec::new();
        }
        match self.messages[at].extra.get("tool_calls") {
            Some(Value::Array(calls)) => calls.iter().skip(answered).cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Answers the next pending tool call with `result`; once every call of the last answer
    /// has its result, the model answers (`Some(turn)`).
    pub fn tool_result(&mut self, result: &str, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<Option<Turn>> {
        let Some(call) = self.pending_calls().into_iter().next() else {
            bail!("there is no tool call waiting for a result");
        };
        let mut m = Message::new("tool", result);
        for (key, value) in [("tool_call_id", &call["id"]), ("name", &call["function"]["name"])] {
            m.extra.insert(key.into(), value.clone());
        }
        self.messages.push(m);
        if !self.pending_calls().is_empty() {
            return Ok(None);
        }
        match self.answer(on_text) {
            Ok(turn) => Ok(Some(turn)),
            Err(e) => {
                // A failed answer leaves the result unsent, so it can be given again.
                self.messages.pop();
                Err(e)
            }
        }
    }

    pub fn model(&self) -> &'m LoadedModel {
        self.lm
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replaces the settings; a changed seed restarts the random sequence.
    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
        settings.sampling.validate()?;
        let reseed = settings.sampling.seed != self.settings.sampling.seed;
        self.settings = settings;
        if reseed {
            self.sampler = Sampler::new(self.settings.sampling.clone());
        } else {
            let mut s = Sampler::new(self.settings.sampling.clone());
            std::mem::swap(&mut s, &mut self.sampler);
            self.sampler.take_rng_from(s);
        }
        Ok(())
    }

    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// Sets or removes the system prompt; the next turn re-runs only what changed.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system.filter(|s| !s.trim().is_empty());
    }

    /// The whole conversation, system prompt first, as chat messages.
    pub fn messages(&self) -> Vec<Message> {
        let mut all = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            all.push(Message::new("system", s.clone()));
        }
        all.extend(self.messages.iter().cloned());
        all
    }

    /// Replaces the conversation (a leading system message becomes the system prompt).
    pub fn load(&mut self, mut messages: Vec<Message>) -> Result<()> {
        for (i, m) in messages.iter().enumerate() {
            if !["system", "user", "assistant", "tool"].contains(&m.role.as_str()) {
                bail!(
                    "message {} has role `{}` (expected system, user, assistant or tool)",
                    i + 1,
                    m.role
                );
            }
            if m.role == "system" && i > 0 {
                bail!("message {}: a system message may only come first", i + 1);
            }
        }
        self.system = if messages.first().is_some_and(|m| m.role == "system") {
            Some(messages.remove(0).content)
        } else {
            None
        };
        self.messages = messages;
        Ok(())
    }

    /// A new conversation with the same system prompt.
    pub fn clear(&mut self) {
        self.messages.clear();
    }

    /// Drops the last exchange (the last user message and what follows it). False if empty.
    pub fn undo(&mut self) -> bool {
        match self.messages.iter().rposition(|m| m.role == "user") {
            Some(i) => {
                self.messages.truncate(i);
                true
            }
            None => false,
        }
    }

    /// Tokens in the KV cache / the context size.
    pub fn context_used(&self) -> usize {
        self.session.tokens().len()
    }

    pub fn context_size(&self) -> usize {
        self.session.context_size()
    }

    /// Token ids of the conversation as the model sees it, ready for the assistant's answer.
    pub fn prompt_ids(&self) -> Result<Vec<u32>> {
        let rendered = self.render()?;
        self.lm.tokenizer.encode_chat(&rendered, self.add_bos)
    }

    fn render(&self) -> Result<String> {
        self.lm.render(&self.messages(), &self.tools)
    }

    /// [`Self::prompt_ids`], or `None` without tokenizing when the rendered conversation is
    /// certainly longer than the context (see [`crate::tokenizer::Tokenizer::max_text_bytes`]).
    fn prompt_ids_within_context(&self) -> Result<Option<Vec<u32>>> {
        let rendered = self.render()?;
        if rendered.len() > self.lm.tokenizer.max_text_bytes(self.context_size()) {
            return Ok(None);
        }
        self.lm.tokenizer.encode_chat(&rendered, self.add_bos).map(Some)
    }

    /// Sends a user message and streams the answer through `on_text`.
    pub fn send(&mut self, text: &str, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<Turn> {
        self.messages.push(Message::new("user", text));
        match self.answer(on_text) {
            Ok(turn) => Ok(turn),
            Err(e) => {
                // A refused message leaves the conversation as it was.
                if self.messages.last().is_some_and(|m| m.role == "user") {
                    self.messages.pop();
                }
                Err(e)
            }
        }
    }

    /// Drops the last answer and generates it again.
    pub fn regen(&mut self, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<Turn> {
        match self.messages.last() {
            Some(m) if m.role == "assistant" => {
                self.messages.pop();
            }
            Some(m) if m.role == "user" || m.role == "tool" => {}
            _ => bail!("there is no answer to regenerate yet"),
        }
        self.answer(on_text)
    }

    /// Generates the assistant's next message for the conversation as it stands.
    fn answer(&mut self, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<Turn> {
        let (ids, dropped) = self.fit()?;
        let opts = GenerateOptions {
            max_tokens: self.settings.max_tokens,
            stop_ids: self.lm.stop_ids.clone(),
            stop_strings: self.settings.stop.clone(),
            ignore_eos: self.settings.ignore_eos,
            logprobs: None,
            constraint: if self.messages.last().is_some_and(|m| m.role == "tool") {
                self.after_results.clone()
            } else {
                self.constraint.clone()
            },
        };
        // With tools, the text outside calls streams; calls are collected.
        let salt = format!("{}-{}", self.sampler.params().seed, self.messages.len());
        let mut splitter =
            (!self.tools.is_empty() && self.tool_choice.parses_calls()).then(|| CallSplitter::new(&salt));
        let mut calls = Vec::new();
        let mut content = String::new();
        let mut route = |pieces: Vec<Piece>, on_text: &mut dyn FnMut(&str) -> Result<()>| -> Result<()> {
            for p in pieces {
                match p {
                    Piece::Content(c) => {
                        content.push_str(&c);
                        on_text(&c)?;
                    }
                    Piece::Call(call) => calls.push(call),
                }
            }
            Ok(())
        };
        let generating = crate::interrupt::generating();
        let completion = generate(
            &mut self.session,
            &self.lm.tokenizer,
            &mut self.sampler,
            &ids,
            &opts,
            crate::interrupt::cancel_flag(),
            &mut |piece| match &mut splitter {
                Some(s) => route(s.push(piece), on_text),
                None => on_text(piece),
            },
        )?;
        drop(generating);
        if let Some(s) = &mut splitter {
            route(s.finish(), on_text)?;
        }
        let shown = if splitter.is_some() {
            content
        } else {
            completion.text.clone()
        };
        let mut reply = Message::new("assistant", shown.clone());
        if !calls.is_empty() {
            let list: Vec<Value> = calls.iter().map(ToolCall::to_message).collect();
            reply.extra.insert("tool_calls".into(), list.into());
        }
        if completion.finish == FinishReason::Cancelled {
            reply.extra.insert(INTERRUPTED.into(), true.into());
        }
        self.messages.push(reply);
        Ok(Turn {
            completion,
            dropped,
            calls,
            shown,
        })
    }

    /// Renders the conversation, dropping the oldest exchanges until it fits with room for an
    /// answer. The system prompt and the latest message always stay; if they alone do not fit,
    /// the message is refused.
    fn fit(&mut self) -> Result<(Vec<u32>, usize)> {
        let ctx = self.context_size();
        let room = self.settings.max_tokens.clamp(1, (ctx / 4).max(1));
        let mut dropped = 0;
        loop {
            let ids = self.prompt_ids_within_context()?;
            if let Some(ids) = ids.as_ref().filter(|ids| ids.len() + room <= ctx) {
                return Ok((ids.clone(), dropped));
            }
            // The oldest exchange: from the first message up to (not including) the next user message.
            let users: Vec<usize> = self
                .messages
                .iter()
                .enumerate()
                .filter(|(_, m)| m.role == "user")
                .map(|(i, _)| i)
                .collect();
            if users.len() < 2 {
                match ids {
                    // It fits, only with less room for the answer than usual.
                    Some(ids) if ids.len() < ctx => return Ok((ids, dropped)),
                    Some(ids) => bail!(
                        "the message is too long: the conversation needs {} tokens, more than the context of {ctx} (system prompt included); shorten it or raise --ctx-size",
                        ids.len()
                    ),
                    None => bail!(
                        "the message is too long: the conversation is more text than a context of {ctx} tokens can hold (system prompt included); shorten it or raise --ctx-size"
                    ),
                }
            }
            self.messages.drain(..users[1]);
            dropped += 1;
        }
    }
}
