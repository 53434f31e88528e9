//! Perplexity of a model on a text, in windows, and how far another model's (a quantized
//! format's) next-token distributions are from a saved base.
//!
//! Two ways to cut the text, named in every result:
//! - `llama.cpp`: non-overlapping windows of `ctx` tokens (each starting with BOS when the model
//!   uses one, as llama-perplexity does), only the tokens of each window's second half scored, so
//!   every scored token has at least `ctx/2` tokens before it;
//! - `sliding`: the strided sliding window of the transformers perplexity guide: windows of `ctx`
//!   tokens starting every `stride` tokens, each token scored at most once, in the first window
//!   that ends after it, with everything from that window's start before it (with `stride` equal
//!   to `ctx` a window's first token has nothing before it and is not scored).
//!
//! Windows are independent: several run in one batched step.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::loader::LoadedModel;
use crate::model::{Cache, LogitsFor, RowKind, Step};
use crate::sampling::log_softmax;

/// How the text is cut into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "name")]
pub enum Method {
    /// llama-perplexity's windows: second halves scored.
    LlamaCpp,
    /// The transformers guide's strided sliding window.
    Sliding { stride: usize },
}

impl Method {
    pub fn describe(&self, ctx: usize) -> String {
        match self {
            Method::LlamaCpp => format!("llama.cpp (windows of {ctx} tokens, second halves scored)"),
            Method::Sliding { stride } => {
                format!("sliding window (windows of {ctx} tokens every {stride}, each token scored once)")
            }
        }
    }
}

/// One window: tokens `start..start + len` of the text (the first replaced by `first`), and the
/// positions `j` in it whose logits score the token at `j + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
    pub first: Option<u32>,
    pub scored: std::ops::Range<usize>,
}

/// The windows of a text of `n` tokens. `bos`: the model's BOS token when it uses one.
pub fn windows(n: usize, ctx: usize, method: Method, bos: Option<u32>) -> Result<Vec<Window>> {
    if ctx < 2 {
        bail!("a window of {ctx} tokens scores nothing: use at least 2");
    }
    if n < 2 {
        bail!("the text is {n} tokens: nothing to score");
    }
    let mut out = Vec::new();
    match method {
        Method::LlamaCpp => {
            if n < ctx {
                bail!("the text is {n} tokens, shorter than one window of {ctx} tokens: give more text or a smaller window");
            }
            for i in 0..n / ctx {
                out.push(Window {
                    start: i * ctx,
                    len: ctx,
                    first: bos,
                    scored: ctx / 2..ctx - 1,
                });
            }
        }
        Method::Sliding { stride } => {
            if stride == 0 || stride > ctx {
                bail!("stride {stride}: use 1 to the window size ({ctx})");
            }
            let mut prev_end = 0;
            let mut begin = 0;
            loop {
                let end = (begin + ctx).min(n);
                // Tokens prev_end..end are scored (the very first token cannot be).
                let from = prev_end.max(begin + 1);
                if from < end {
                    out.push(Window {
                        start: begin,
                        len: end - begin,
                        first: None,
                        scored: from - begin - 1..end - begin - 1,
                    });
                }
                prev_end = end;
                if end == n {
                    break;
                }
                begin += stride;
            }
        }
    }
    Ok(out)
}

/// The base model's top tokens at each scored position (`--save-logits`, read by `--kl-base`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseLogits {
    pub format: String,
    pub model: String,
    pub vocab_size: usize,
    pub ctx: usize,
    pub method: Method,
    /// Tokens of the text, and a hash of their ids: a base is only compared with the same text
    /// tokenized the same way.
    pub tokens: usize,
    pub tokens_sha256: String,
    /// Alternatives kept per position.
    pub top_k: usize,
    /// Per scored position (windows in order): the top ids and their log-probabilities,
    /// likeliest first, and the log-probability of the text's actual next token.
    pub ids: Vec<Vec<u32>>,
    pub logprobs: Vec<Vec<f32>>,
    pub target_logprobs: Vec<f32>,
}

pub const BASE_FORMAT: &str = "zagreus-perplexity-base-1";
/// Alternatives saved per position: enough that the rest of the probability mass is small for
/// these models; the KL divergence is computed over them and one bucket for the rest.
pub const BASE_TOP_K: usize = 32;

/// A mean with its standard error.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Estimate {
    pub mean: f64,
    pub stderr: f64,
}

#[derive(Default)]
struct Moments {
    n: usize,
    sum: f64,
    sum2: f64,
}

impl Moments {
    fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum2 += x * x;
    }

    fn estimate(&self) -> Estimate {
        if self.n == 0 {
            return Estimate::default();
        }
        let n = self.n as f64;
        let mean = self.sum / n;
        let var = if self.n > 1 {
            ((self.sum2 / n - mean * mean) * n / (n - 1.0)).max(0.0)
        } else {
            0.0
        };
        Estimate {
            mean,
            stderr: (var / n).sqrt(),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub method: Method,
    pub method_name: String,
    pub ctx: usize,
    pub tokens: usize,
    pub windows: usize,
    pub scored: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: Estimate,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub seconds: f64,
    /// Tokens run through the model per second.
    pub tokens_per_second: f64,
    pub kl: Option<KlReport>,
}

/// The comparison with a base (`--kl-base`), as llama-perplexity's `--kl-divergence` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct KlReport {
    pub base_model: String,
    pub kl_divergence: Estimate,
    /// Share of positions where both models' likeliest token is the same.
    pub top1_agreement: Estimate,
    pub base_ppl: f64,
    /// This model's perplexity minus the base's.
    pub delta_ppl: f64,
    pub delta_ppl_stderr: f64,
    /// Mean of ln(p_base / p_this) of the actual next tokens: ln(PPL / base PPL).
    pub ln_ppl_ratio: Estimate,
}

/// What to do besides measuring perplexity.
#[derive(Default)]
pub struct Options<'a> {
    /// Windows run in one batched step at most.
    pub parallel: usize,
    /// Keep the top tokens of every scored position (to save as a base).
    pub save_top_k: Option<usize>,
    /// Compare with a base saved from another run.
    pub base: Option<&'a BaseLogits>,
    /// Called after each step with (tokens scored so far, tokens to score).
    pub progress: Option<&'a mut dyn FnMut(usize, usize)>,
}

pub fn tokens_sha256(ids: &[u32]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Scores `tokens` (the whole text, tokenized as the model sees it) in windows of `ctx`.
/// Returns the report and, with `save_top_k`, the base to save.
pub fn measure(
    lm: &LoadedModel,
    tokens: &[u32],
    ctx: usize,
    method: Method,
    opts: Options,
) -> Result<(Report, Option<BaseLogits>)> {
    let Options {
        parallel,
        save_top_k,
        base,
        mut progress,
    } = opts;
    let bos = lm
        .tokenizer
        .bos()
        .map(|(id, _)| id)
        .filter(|id| tokens.first() == Some(id));
    let wins = windows(tokens.len(), ctx, method, bos)?;
    let vocab = lm.model.vocab_size();
    let total_scored: usize = wins.iter().map(|w| w.scored.len()).sum();
    let hash = tokens_sha256(tokens);
    if let Some(b) = base {
        if b.format != BASE_FORMAT {
            bail!("the base file's format is {:?}, not {BASE_FORMAT:?}", b.format);
        }
        if b.tokens != tokens.len() || b.tokens_sha256 != hash {
            bail!(
                "the base was saved for another text or tokenizer ({} tokens there, {} here, or different ids): score the same text with the same model family",
                b.tokens,
                tokens.len()
            );
        }
        if b.vocab_size != vocab {
            bail!(
                "the base model's vocabulary has {} tokens, this one {vocab}",
                b.vocab_size
            );
        }
        if b.ctx != ctx || b.method != method {
            bail!(
                "the base was scored with {}, this run with {}: use the same windows",
                b.method.describe(b.ctx),
                method.describe(ctx)
            );
        }
        if b.ids.len() != total_scored || b.logprobs.len() != total_scored || b.target_logprobs.len() != total_scored {
            bail!(
                "the base holds {} positions, this text has {total_scored} to score",
                b.ids.len()
            );
        }
    }
    let mut saved = save_top_k.map(|k| BaseLogits {
        format: BASE_FORMAT.into(),
        model: lm.name.clone(),
        vocab_size: vocab,
        ctx,
        method,
        tokens: tokens.len(),
        tokens_sha256: hash.clone(),
        top_k: k,
        ids: vec![Vec::new(); total_scored],
        logprobs: vec![Vec::new(); total_scored],
        target_logprobs: vec![0.0; total_scored],
    });
    // Where each window's positions start in the base (windows in order, whatever ran together).
    let offsets: Vec<usize> = wins
        .iter()
        .scan(0, |acc, w| {
            let at = *acc;
            *acc += w.scored.len();
            Some(at)
        })
        .collect();
    let (mut nll, mut kl, mut top1, mut diff) = (
        Moments::default(),
        Moments::default(),
        Moments::default(),
        Moments::default(),
    );
    let start = Instant::now();
    let mut ran = 0usize;
    let parallel = parallel.max(1);
    // Rows per step over all windows in it.
    const STEP_ROWS: usize = 512;
    let mut logits = Vec::new();
    let mut caches: Vec<Cache> = (0..parallel.min(wins.len())).map(|_| lm.model.new_cache(ctx)).collect();
    let mut scored_so_far = 0usize;
    for (g, group) in wins.chunks(parallel).enumerate() {
        // Each window's tokens, its first replaced by BOS where the method asks.
        let inputs: Vec<Vec<u32>> = group
            .iter()
            .map(|w| {
                let mut t = tokens[w.start..w.start + w.len].to_vec();
                if let Some(b) = w.first {
                    t[0] = b;
                }
                t
            })
            .collect();
        for c in caches.iter_mut() {
            c.truncate(0);
        }
        let piece = (STEP_ROWS / group.len()).max(1);
        let mut done = vec![0usize; group.len()];
        while done.iter().zip(&inputs).any(|(d, t)| d < &t.len()) {
            let active: Vec<usize> = (0..group.len()).filter(|&i| done[i] < inputs[i].len()).collect();
            let pieces: Vec<(usize, usize)> = active
                .iter()
                .map(|&i| (done[i], (done[i] + piece).min(inputs[i].len())))
                .collect();
            {
                let mut chosen: Vec<Option<&mut Cache>> = caches.iter_mut().map(Some).collect();
                let mut steps = Vec::with_capacity(active.len());
                for (&i, &(a, b)) in active.iter().zip(&pieces) {
                    steps.push(Step {
                        cache: chosen[i].take().expect("one step per window"),
                        tokens: &inputs[i][a..b],
                        kind: RowKind::Prompt,
                        logits: LogitsFor::All,
                    });
                }
                lm.model.forward_batch(&mut steps, &mut logits)?;
            }
            let mut row = 0;
            for (&i, &(a, b)) in active.iter().zip(&pieces) {
                let w = &group[i];
                for j in (a..b).filter(|j| w.scored.contains(j)) {
                    let lp = log_softmax(&logits[(row + j - a) * vocab..(row + j - a + 1) * vocab]);
                    let at = offsets[g * parallel + i] + (j - w.scored.start);
                    let target = inputs[i][j + 1] as usize;
                    let x = -(lp[target] as f64);
                    nll.add(x);
                    if let Some(s) = &mut saved {
                        let top = top_k(&lp, s.top_k);
                        s.logprobs[at] = top.iter().map(|&id| lp[id as usize]).collect();
                        s.ids[at] = top;
                        s.target_logprobs[at] = lp[target];
                    }
                    if let Some(b) = base {
                        let (ids, lps) = (&b.ids[at], &b.logprobs[at]);
                        kl.add(kl_top_k(ids, lps, &lp));
                        top1.add(f64::from(u8::from(ids.first() == Some(&argmax(&lp)))));
                        // ln(p_base / p_this) of the actual token: this run's NLL minus the base's.
                        diff.add(x + b.target_logprobs[at] as f64);
                    }
                    scored_so_far += 1;
                }
                row += b - a;
                ran += b - a;
                done[i] = b;
            }
            if let Some(p) = progress.as_mut() {
                p(scored_so_far, total_scored);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let e = nll.estimate();
    let ppl = e.mean.exp();
    let kl = base.map(|b| {
        let d = diff.estimate();
        let base_ppl = (e.mean - d.mean).exp();
        KlReport {
            base_model: b.model.clone(),
            kl_divergence: kl.estimate(),
            top1_agreement: top1.estimate(),
            base_ppl,
            delta_ppl: ppl - base_ppl,
            delta_ppl_stderr: ppl * d.stderr,
            ln_ppl_ratio: d,
        }
    });
    let report = Report {
        method,
        method_name: method.describe(ctx),
        ctx,
        tokens: tokens.len(),
        windows: wins.len(),
        scored: nll.n,
        nll: e,
        ppl,
        ppl_stderr: ppl * e.stderr,
        seconds,
        tokens_per_second: ran as f64 / seconds.max(1e-9),
        kl,
    };
    Ok((report, saved))
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` likeliest ids, likeliest first.
fn top_k(lp: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
    }
    order.truncate(k);
    order.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b)));
    order
}

/// KL(base || this) over the base's top tokens and one bucket for all the others: the exact
/// divergence of the two distributions seen at that resolution (never more than the full one).
fn kl_top_k(ids: &[u32], base_lps: &[f32], lp: &[f32]) -> f64 {
    let (mut kl, mut p_top, mut q_top) = (0.0f64, 0.0f64, 0.0f64);
    for (&id, &blp) in ids.iter().zip(base_lps) {
        let p = (blp as f64).exp();
        let lq = lp[id as usize] as f64;
        kl += p * (blp as f64 - lq);
        p_top += p;
        q_top += lq.exp();
    }
    let p_rest = (1.0 - p_top).max(0.0);
    let q_rest = (1.0 - q_top).max(1e-12);
    if p_rest > 1e-12 {
        kl += p_rest * (p_rest.ln() - q_rest.ln());
    }
    kl.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_windows_score_second_halves() {
        let w = windows(10, 4, Method::LlamaCpp, Some(1)).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[1].start, w[1].len, w[1].first, w[1].scored.clone()),
            (4, 4, Some(1), 2..3)
        );
        assert!(windows(3, 4, Method::LlamaCpp, None).is_err());
    }

    #[test]
    fn sliding_windows_score_every_token_once() {
        for (n, ctx, stride) in [(10, 4, 2), (10, 4, 4), (11, 5, 3), (5, 8, 4), (9, 3, 1)] {
            let w = windows(n, ctx, Method::Sliding { stride }, None).unwrap();
            let mut scored: Vec<usize> = w
                .iter()
                .flat_map(|w| w.scored.clone().map(move |j| w.start + j + 1))
                .collect();
            let count = scored.len();
            scored.dedup();
            assert_eq!(scored.len(), count, "{n} {ctx} {stride}: a token scored twice");
            // Every token but the first, except (with stride = ctx, as in the guide) those that
            // open a window: nothing in that window comes before them.
            let expected: Vec<usize> = (1..n).filter(|p| stride < ctx || p % stride != 0).collect();
            assert_eq!(scored, expected, "{n} {ctx} {stride}");
            assert!(w.iter().all(|w| w.len <= ctx));
        }
        assert!(windows(10, 4, Method::Sliding { stride: 5 }, None).is_err());
    }

    #[test]
    fn kl_of_a_distribution_with_itself_is_zero() {
        let lp = log_softmax(&[1.0, 2.0, 0.5, -1.0, 3.0]);
        let top = top_k(&lp, 3);
        let base: Vec<f32> = top.iter().map(|&i| lp[i as usize]).collect();
        assert!(kl_top_k(&top, &base, &lp).abs() < 1e-9);
        let other = log_softmax(&[3.0, 2.0, 0.5, -1.0, 1.0]);
        assert!(kl_top_k(&top, &base, &other) > 0.1);
    }
}
