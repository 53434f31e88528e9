//! Choosing the next token: repetition, presence and frequency penalties, temperature, top-k,
//! top-p and min-p, in the order transformers' `generate` applies them, with a seeded RNG.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Sampling settings. Neutral values switch a stage off: temperature 0 (greedy), top_k 0,
/// top_p 1, min_p 0, repeat_penalty 1, presence/frequency 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub min_p: f64,
    pub repeat_penalty: f64,
    /// How many of the most recent tokens (prompt included) the penalties look at; 0 turns the
    /// penalties off, -1 means the whole context.
    pub repeat_last_n: i64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub seed: u64,
}

impl SamplingParams {
    /// Checks ranges; the message names the setting and its value.
    pub fn validate(&self) -> anyhow::Result<()> {
        let bad = |name: &str, v: f64, want: &str| anyhow::anyhow!("{name} {v} is out of range: {want}");
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(bad(
                "temperature",
                self.temperature,
                "use 0 (greedy) or a positive number",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", self.top_p, "use a number in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", self.min_p, "use a number in [0, 1]"));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(bad(
                "repeat_penalty",
                self.repeat_penalty,
                "use a positive number (1 = off)",
            ));
        }
        if self.repeat_last_n < -1 {
            return Err(anyhow::anyhow!(
                "repeat_last_n {} is out of range: use -1, 0 or a positive count",
                self.repeat_last_n
            ));
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return Err(anyhow::anyhow!(
                "presence_penalty and frequency_penalty must be finite numbers"
            ));
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch space reused across steps (no allocation per token).
    candidates: Vec<(u32, f32)>,
    window: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            candidates: Vec::new(),
            window: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Continues `other`'s random sequence (new settings, same seed, no restart).
    pub fn take_rng_from(&mut self, other: Sampler) {
        self.rng = other.rng;
    }

    /// Picks the next token from `logits` (modified in place by the penalties), given the
    /// tokens so far (`history`: prompt and generated).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_penalties(logits, history);
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let temp = p.temperature as f32;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, l)| (i as u32, l / temp)),
        );
        if c.is_empty() {
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);
        // Softmax over the survivors (max first, so exp never overflows).
        let max = c[0].1;
        let mut total = 0f64;
        for (_, l) in c.iter_mut() {
            let e = ((*l - max) as f64).exp() as f32;
            total += e as f64;
            *l = e;
        }
        for (_, pr) in c.iter_mut() {
            *pr = (*pr as f64 / total) as f32;
        }
        if p.top_p < 1.0 {
            let mut cum = 0f64;
            let mut keep = c.len();
            for (i, (_, pr)) in c.iter().enumerate() {
                cum += *pr as f64;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p as f32;
            let keep = c.iter().take_while(|(_, pr)| *pr >= floor).count();
            c.truncate(keep.max(1));
        }
        let mass: f64 = c.iter().map(|(_, pr)| *pr as f64).sum();
        let mut r = self.rng.random::<f64>() * mass;
        for (id, pr) in c.iter() {
            r -= *pr as f64;
            if r < 0.0 {
                return *id;
            }
        }
        c[c.len() - 1].0
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        let active = p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if !active || p.repeat_last_n == 0 {
            return;
        }
        let window = if p.repeat_last_n < 0 {
            history
        } else {
            &history[history.len().saturating_sub(p.repeat_last_n as usize)..]
        };
        // Count occurrences by sorting a copy of the window (a reused buffer).
        self.window.clear();
        self.window.extend_from_slice(window);
        self.window.sort_unstable();
        for run in self.window.chunk_by(|a, b| a == b) {
            let (t, n) = (run[0], run.len());
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if p.repeat_penalty != 1.0 {
                let rp = p.repeat_penalty as f32;
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
            *l -= p.presence_penalty as f32 + p.frequency_penalty as f32 * n as f32;
        }
    }
}

/// Index of the largest logit (the first on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value in 16 lanes (the compiler vectorises this), then its first position: a
    // greedy step over a 128k vocabulary for many sequences stays off the critical path. A NaN
    // anywhere (seen through `x · 0`, which is also NaN for infinities) takes the plain loop.
    const LANES: usize = 16;
    let mut top = [f32::NEG_INFINITY; LANES];
    let mut probe = [0f32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            top[j] = if c[j] > top[j] { c[j] } else { top[j] };
            probe[j] += c[j] * 0.0;
        }
    }
    let finite = probe.iter().chain(tail).all(|v| (v * 0.0) == 0.0);
    if !finite {
        return argmax_plain(logits);
    }
    let max = top
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
    logits.iter().position(|v| *v == max).unwrap_or(0) as u32
}

/// `argmax` one logit at a time (NaNs skipped unless nothing else is left).
fn argmax_plain(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax` of raw logits, for reporting log-probabilities.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((*l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|l| (*l as f64 - lse) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_and_survives_odd_values() {
        let plain = |v: &[f32]| argmax_plain(v);
        let mut v: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1013) as f32 / 100.0 - 5.0).collect();
        assert_eq!(argmax(&v), plain(&v));
        v[517] = 50.0;
        v[900] = 50.0;
        assert_eq!(argmax(&v), 517, "the first of equal maxima");
        v[999] = 60.0;
        assert_eq!(argmax(&v), 999, "in the tail past the last whole chunk");
        for odd in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 3, 500, 999] {
                let mut w = v.clone();
                w[at] = odd;
                assert_eq!(argmax(&w), plain(&w), "{odd} at {at}");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[1.0]), 0);
    }

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_is_transformers_style() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..params()
        });
        let mut l = [4.0, -4.0, 4.0];
        s.apply_penalties(&mut l, &[0, 1, 0]);
        assert_eq!(l, [2.0, -8.0, 4.0]);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..params()
        });
        let mut l = [4.0, 4.0, 4.0];
        s.apply_penalties(&mut l, &[0, 1, 0]);
        assert_eq!(l, [1.5, 2.5, 4.0]);
        // The window only reaches back repeat_last_n tokens.
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 1,
            ..params()
        });
        let mut l = [4.0, 4.0];
        s.apply_penalties(&mut l, &[0, 1]);
        assert_eq!(l, [4.0, 2.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut s = Sampler::new(SamplingParams { top_k: 1, ..params() });
        assert_eq!(s.sample(&mut logits.clone(), &[]), argmax(&logits));
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params() });
            (0..20).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        for (p, allowed) in [
            (SamplingParams { top_p: 0.5, ..params() }, vec![0]),
            (SamplingParams { top_p: 0.8, ..params() }, vec![0, 1]),
            (SamplingParams { min_p: 0.3, ..params() }, vec![0, 1]),
        ] {
            let mut s = Sampler::new(p);
            for _ in 0..200 {
                let t = s.sample(&mut logits.clone(), &[]);
                assert!(allowed.contains(&t), "{t} not in {allowed:?}");
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut s = Sampler::new(params());
        let ones = (0..4000).filter(|_| s.sample(&mut logits.clone(), &[]) == 1).count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
