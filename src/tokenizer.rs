//! The tokenizer: `tokenizer.json` plus the special tokens of `tokenizer_config.json`, the BOS
//! rules these models expect, and a UTF-8-safe streaming detokenizer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::budget::{self, Limits};

/// How long one encoding may run: a pre-tokenizer regex that backtracks badly is stopped here.
const ENCODE_TIME: Duration = Duration::from_secs(60);
/// Memory one encoding may hold: tokenizers use about 200 bytes per input byte, so a fixed
/// allowance plus 512 bytes per byte of text.
fn encode_limits(text_len: usize) -> Limits {
    Limits {
        memory: (256usize << 20).saturating_add(text_len.saturating_mul(512)),
        time: ENCODE_TIME,
    }
}

/// Parses a tokenizer.json held in memory; the tokenizers library's panics become errors.
pub fn parse_tokenizer_json(bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    match budget::catch_panic(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => bail!("{e}"),
        Err(panic) => bail!("the tokenizers library failed on it: {panic}"),
    }
}

/// What `tokenizer_config.json` says about special tokens and templates.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// `true` when the file has a `bos_token` key (even if null): then it, not config.json, decides.
    pub has_bos_key: bool,
    pub add_bos_token: Option<bool>,
    pub chat_template: Option<String>,
}

/// A special token as written in tokenizer_config.json: a string or an AddedToken object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Object { content: String },
}

/// `chat_template` is a string, or a list of named templates (`default`, `tool_use`, ...).
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
struct RawTokenizerConfig {
    #[serde(default, deserialize_with = "some_token")]
    bos_token: Option<Option<TokenSpec>>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    add_bos_token: Option<bool>,
    chat_template: Option<TemplateSpec>,
}

/// Distinguishes a missing `bos_token` key (outer None) from an explicit null (Some(None)).
fn some_token<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<TokenSpec>>, D::Error> {
    Option::<TokenSpec>::deserialize(d).map(Some)
}

fn token_text(spec: Option<TokenSpec>) -> Option<String> {
    spec.map(|s| match s {
        TokenSpec::Text(t) => t,
        TokenSpec::Object { content } => content,
    })
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; a missing file is an empty config.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = crate::bounded::read_text(path, crate::bounded::TOKENIZER_CONFIG_LIMIT, "the tokenizer config")?;
        Self::from_json(&text).with_context(|| format!("invalid {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawTokenizerConfig = serde_json::from_str(text)?;
        let chat_template = match raw.chat_template {
            None => None,
            Some(TemplateSpec::One(t)) => Some(t),
            Some(TemplateSpec::Named(list)) => list
                .iter()
                .find(|t| t.name == "default")
                .or(list.first())
                .map(|t| t.template.clone()),
        };
        Ok(Self {
            has_bos_key: raw.bos_token.is_some(),
            bos_token: token_text(raw.bos_token.flatten()),
            eos_token: token_text(raw.eos_token),
            pad_token: token_text(raw.pad_token),
            unk_token: token_text(raw.unk_token),
            add_bos_token: raw.add_bos_token,
            chat_template,
        })
    }
}

/// A tokenizer with the model's BOS token resolved to an id.
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos: Option<(u32, String)>,
    add_bos_token: Option<bool>,
    /// Bytes of the longest token's text (an upper bound on the text one token covers).
    max_token_bytes: usize,
}

/// Reads and parses a tokenizer.json of at most [`crate::bounded::TOKENIZER_LIMIT`] bytes.
pub fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = crate::bounded::read_file(path, crate::bounded::TOKENIZER_LIMIT, "the tokenizer")?;
    parse_tokenizer_json(&bytes).with_context(|| format!("{} is not a valid tokenizer.json", path.display()))
}

impl Tokenizer {
    /// Loads `tokenizer.json`. The BOS token comes from tokenizer_config.json when it names one
    /// (or says null), else from config.json's `bos_token_id`.
    pub fn from_file(path: &Path, tcfg: &TokenizerConfig, config_bos_id: Option<u32>) -> Result<Self> {
        Self::new(read_tokenizer_json(path)?, tcfg, config_bos_id)
    }

    pub fn new(inner: tokenizers::Tokenizer, tcfg: &TokenizerConfig, config_bos_id: Option<u32>) -> Result<Self> {
        let bos = if tcfg.has_bos_key {
            match &tcfg.bos_token {
                Some(text) => Some((
                    inner
                        .token_to_id(text)
                        .with_context(|| format!("bos_token `{text}` is not in the tokenizer's vocabulary"))?,
                    text.clone(),
                )),
                None => None,
            }
        } else {
            config_bos_id.and_then(|id| inner.id_to_token(id).map(|t| (id, t)))
        };
        let max_token_bytes = inner.get_vocab(true).keys().map(|t| t.len()).max().unwrap_or(1).max(1);
        Ok(Self {
            inner: Arc::new(inner),
            bos,
            add_bos_token: tcfg.add_bos_token,
            max_token_bytes,
        })
    }

    /// The most bytes of text `tokens` tokens can cover (each token covers at most the bytes of
    /// the vocabulary's longest token): text longer than this cannot fit, without tokenizing it.
    pub fn max_text_bytes(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.max_token_bytes)
    }

    /// Refuses `text` (named `what`) when it is certainly more than `tokens` tokens, before
    /// spending time and memory on tokenizing it.
    pub fn check_fits(&self, text: &str, tokens: usize, what: &str) -> Result<()> {
        let most = self.max_text_bytes(tokens);
        if text.len() > most {
            bail!(
                "{what} is {} bytes, more than a context of {tokens} tokens can hold (at most {most} bytes: {} per token, the longest token of this vocabulary); shorten it (--ctx-size sets the context, up to the model's maximum)",
                text.len(),
                self.max_token_bytes
            );
        }
        Ok(())
    }

    /// The BOS token (id, text), if the model has one.
    pub fn bos(&self) -> Option<(u32, &str)> {
        self.bos.as_ref().map(|(id, t)| (*id, t.as_str()))
    }

    /// The underlying Hugging Face tokenizer (shared).
    pub fn inner(&self) -> Arc<tokenizers::Tokenizer> {
        self.inner.clone()
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes a rendered chat prompt: no automatic special tokens (as transformers'
    /// `apply_chat_template` does), then one BOS in front when the model has one, `add_bos` is
    /// set, and the text does not already start with it.
    pub fn encode_chat(&self, rendered: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = self.encode(rendered, false)?;
        if let Some((bos_id, bos_text)) = self.bos() {
            if add_bos && !rendered.starts_with(bos_text) && ids.first() != Some(&bos_id) {
                ids.insert(0, bos_id);
            }
        }
        Ok(ids)
    }

    /// Encodes raw text with the tokenizer's own special-token rules (its post-processor), with
    /// `add_bos_token` from tokenizer_config.json honoured. `add_bos = false` drops the BOS the
    /// tokenizer would add (one the text itself starts with stays), and a BOS is never doubled.
    pub fn encode_raw(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = self.encode(text, true)?;
        let Some((bos_id, bos_text)) = self.bos() else {
            return Ok(ids);
        };
        let text_has = text.starts_with(bos_text);
        let added = ids.first() == Some(&bos_id) && !(text_has && ids.get(1) != Some(&bos_id));
        let want = add_bos && self.add_bos_token.unwrap_or(added) && !text_has;
        if added && !want {
            ids.remove(0);
        } else if want && !added {
            ids.insert(0, bos_id);
        }
        Ok(ids)
    }

    /// Encodes under a time and memory budget, with the tokenizers library's panics (a regex
    /// engine that gives up on a backtracking pattern) turned into errors.
    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let inner = self.inner.clone();
        let owned = text.to_string();
        let out = budget::run(encode_limits(text.len()), move || {
            inner
                .encode_fast(owned.as_str(), special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string())
        });
        match out {
            Ok(Ok(ids)) => Ok(ids),
            Ok(Err(e)) => bail!("cannot tokenize the prompt: {e}"),
            Err(e) => bail!("cannot tokenize the prompt: the tokenizer was stopped: {e}"),
        }
    }

    /// Text of `ids` with special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match budget::catch_panic(|| self.inner.decode(ids, true)) {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e)) => bail!("cannot decode tokens: {e}"),
            Err(panic) => bail!("cannot decode tokens: the tokenizer failed: {panic}"),
        }
    }

    /// Text of one token, special tokens included (for log-probabilities and diagnostics).
    pub fn token_text(&self, id: u32) -> String {
        budget::catch_panic(|| self.inner.decode(&[id], false).unwrap_or_default()).unwrap_or_default()
    }

    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tok: self,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }
}

/// Turns generated token ids into text as they arrive, emitting a piece as soon as it is valid
/// UTF-8 (accents and emoji split over several byte tokens are held until complete) and never
/// printing special tokens.
///
/// It decodes a small window of recent tokens and emits what the newest token added, so that
/// decoders whose output depends on neighbours (leading spaces, byte fallback) stay exact.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl TextStream<'_> {
    /// Adds a token; returns the new text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.len() > self.prefix.len() && !text.ends_with('\u{FFFD}') {
            let Some(new) = text.strip_prefix(self.prefix.as_str()) else {
                bail!("internal error: detokenized text changed its prefix");
            };
            let new = new.to_string();
            self.ids.drain(..self.prefix_index);
            self.prefix = self.tok.decode(&self.ids)?;
            self.prefix_index = self.ids.len();
            return Ok(Some(new));
        }
        Ok(None)
    }

    /// Whatever is still held back (an incomplete UTF-8 sequence at the very end), as text with
    /// replacement characters.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tok.decode(&self.ids)?;
        self.ids.clear();
        let out = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) if !rest.is_empty() => Some(rest.to_string()),
            _ => None,
        };
        self.prefix.clear();
        self.prefix_index = 0;
        Ok(out)
    }
}

/// GPT-2's byte-to-character table for byte-level BPE vocabularies.
fn byte_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

/// The Llama-3 split pattern (llama.cpp's `llama-bpe` pre-tokenizer).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds a transformers `tokenizer.json` (and the tokenizer_config facts) from a GGUF's
/// byte-level BPE vocabulary, the way transformers converts GGUF tokenizers: GPT-2's byte-level
/// pre-tokenizer, or the split pattern the file's `tokenizer.ggml.pre` names; control tokens as
/// special added tokens, user-defined ones as plain added tokens.
pub fn from_gguf(f: &crate::model::gguf::GgufFile) -> Result<(tokenizers::Tokenizer, TokenizerConfig)> {
    let model = f.str("tokenizer.ggml.model").unwrap_or("(none)");
    if model != "gpt2" {
        bail!("the GGUF tokenizer is `{model}`; zagreus builds byte-level BPE (`gpt2`) ones: pass --tokenizer tokenizer.json");
    }
    let tokens = f
        .strings("tokenizer.ggml.tokens")
        .context("no tokenizer.ggml.tokens in the GGUF metadata")?;
    let merges = f.strings("tokenizer.ggml.merges").unwrap_or_default();
    let types = f.ints("tokenizer.ggml.token_type").unwrap_or_default();
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let key = if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, i.into());
    }
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(types.iter()).enumerate() {
        let special = match ty {
            3 if in_alphabet(t) => true,
            4 => false,
            _ => continue,
        };
        added.push(serde_json::json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special,
        }));
    }
    let split = match f.str("tokenizer.ggml.pre") {
        Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe") => Some(LLAMA3_SPLIT),
        Some("qwen2" | "deepseek-r1-qwen") => Some(QWEN2_SPLIT),
        _ => None,
    };
    // Llama-3 vocabularies take a word that is a token whole, before any merge (their
    // tokenizer.json says `ignore_merges`, and llama.cpp does the same for this pre-tokenizer).
    let ignore_merges = split == Some(LLAMA3_SPLIT);
    let pre = match split {
        Some(pattern) => serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ],
        }),
        None => {
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };
    let token_at = |key: &str| f.u64(key).and_then(|id| tokens.get(id as usize)).map(|t| t.to_string());
    let bos = token_at("tokenizer.ggml.bos_token_id");
    let add_bos = f
        .get("tokenizer.ggml.add_bos_token")
        .map(|v| matches!(v, crate::model::gguf::Value::Bool(true)));
    let post = match (&bos, add_bos) {
        (Some(b), Some(true)) => serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [f.u64("tokenizer.ggml.bos_token_id")], "tokens": [b]}},
        }),
        _ => serde_json::Value::Null,
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges,
        },
    });
    let tok = parse_tokenizer_json(json.to_string().as_bytes()).map_err(|e| {
        anyhow!(
            "{}: cannot build the tokenizer from the GGUF metadata: {e}",
            f.path.display()
        )
    })?;
    let cfg = TokenizerConfig {
        has_bos_key: true,
        bos_token: bos,
        eos_token: token_at("tokenizer.ggml.eos_token_id"),
        pad_token: token_at("tokenizer.ggml.padding_token_id"),
        unk_token: token_at("tokenizer.ggml.unknown_token_id"),
        add_bos_token: add_bos,
        chat_template: f.str("tokenizer.chat_template").map(String::from),
    };
    Ok((tok, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_config_variants() {
        let c = TokenizerConfig::from_json(
            r#"{"bos_token":{"content":"<s>","lstrip":false},"eos_token":"</s>","add_bos_token":false,
               "chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]}"#,
        )
        .unwrap();
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.add_bos_token, Some(false));
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert!(c.has_bos_key);
        let c = TokenizerConfig::from_json(r#"{"bos_token":null}"#).unwrap();
        assert!(c.has_bos_key && c.bos_token.is_none());
        let c = TokenizerConfig::from_json(r#"{}"#).unwrap();
        assert!(!c.has_bos_key);
    }
}
