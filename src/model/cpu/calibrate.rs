//! Which kernels a quantized format runs with on this CPU, chosen by measurement.
//!
//! Q8_0 and Q4 matrices can be multiplied two ways: widening the weights to f32 (exact in the
//! activations, and what wins where float throughput is high) or with integer dot products on
//! 8-bit activations (four times the values per instruction, and what wins where the widening
//! instructions are the bottleneck). Which is faster depends on the CPU in ways no fixed rule
//! captures (port layout, VNNI throughput, memory bandwidth), so the first run on a CPU times
//! both on a small matrix (a few tens of milliseconds) and keeps the answer in
//! `$XDG_CACHE_HOME/zagreus/kernels.json` (default `~/.cache`), keyed by the CPU model, the
//! instruction level and the zagreus version. `ZAGREUS_KERNEL=float|int8|int8+float` forces a
//! choice (`int8+float`: integer decoding, float prefill).
//!
//! BF16 in the fast precision is chosen the same way between f32 arithmetic and BF16 dot
//! products (`vdpbf16ps`), where the CPU has them: some run them at the FMA rate with twice the
//! multiply-adds, others far below it. Q8_0 and Q4 in the fast precision are timed apart from
//! the exact precision's choice, since one-byte activations halve the integer kernels' work.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::arena::{Arena, Placement};
use super::isa::{cpu_model, warn, Dot, Isa, Level};
use super::qmatrix::{matmul_serial, Format, Precision, QMatrix, Storage, Variant};

/// Changes whenever what `measure` does changes, so that older measurements are not reused.
const METHOD: u32 = 2;

/// How a variant was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The format has a single kernel family.
    Only,
    /// `ZAGREUS_KERNEL`.
    Forced,
    /// Timed in this process.
    Measured,
    /// Timed earlier on this CPU, read from the cache file.
    Cached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub variant: Variant,
    pub reason: Reason,
}

impl Choice {
    /// For messages: `int8 (measured on this CPU)`.
    pub fn describe(&self) -> String {
        let why = match self.reason {
            Reason::Only => "the only kernels for this format",
            Reason::Forced => "forced by ZAGREUS_KERNEL",
            Reason::Measured => "measured on this CPU",
            Reason::Cached => "measured earlier on this CPU",
        };
        format!("{} ({why})", self.variant.name())
    }
}

/// The kernels `format` runs with at `level`.
pub fn choose(level: Level, format: Format) -> Choice {
    if !format.quantized() {
        return Choice {
            variant: Variant::Float,
            reason: Reason::Only,
        };
    }
    if let Some(choice) = forced() {
        return choice;
    }
    // Plain code has no integer advantage to find: keep the exact float kernels.
    if level.isa == Isa::Portable {
        return Choice {
            variant: Variant::Float,
            reason: Reason::Only,
        };
    }
    let family = Family::of(format);
    remembered(level, family, || measure(level, family.format(), Precision::Exact))
}

/// The kernels Q8_0 or Q4 weights run with at `level` in the fast precision, where it applies:
/// at levels with byte dot products (VNNI, AVX-VNNI, dotprod), whose integer kernels then skip
/// the residual pass. Halving their work can change which family is faster, so this is timed
/// apart from `choose`. `None` elsewhere (Q8_0's integer kernel there already makes one pass
/// over 16-bit activations, and plain code has no integer advantage): one-byte activations
/// would cost accuracy for no speed, and the exact precision's choice applies.
pub fn choose_fast_quantized(level: Level, format: Format) -> Option<Choice> {
    if !format.quantized() || level.dot == Dot::None {
        return None;
    }
    if let Some(choice) = forced() {
        return Some(choice);
    }
    let family = Family::of(format).fast();
    Some(remembered(level, family, || {
        measure(level, family.format(), Precision::Fast)
    }))
}

/// `ZAGREUS_KERNEL`'s choice for the quantized formats, if it names one (a warning if not).
fn forced() -> Option<Choice> {
    let v = std::env::var("ZAGREUS_KERNEL").ok()?;
    match Variant::from_name(&v).filter(|v| *v != Variant::Bf16Dot) {
        Some(variant) => Some(Choice {
            variant,
            reason: Reason::Forced,
        }),
        None => {
            warn(&format!(
                "ZAGREUS_KERNEL={v}: unknown (known: float, int8, int8+float); measuring instead"
            ));
            None
        }
    }
}

/// The kernels BF16 weights run with at `level` in the fast precision: BF16 dot products where
/// the level has them and they beat the exact float kernels (timed once per CPU, as the integer
/// kernels are: on some CPUs `vdpbf16ps` runs far below the FMA rate), the float kernels
/// otherwise.
pub fn choose_fast_bf16(level: Level) -> Choice {
    if !level.bf16_dot() {
        return Choice {
            variant: Variant::Float,
            reason: Reason::Only,
        };
    }
    remembered(level, Family::Bf16Fast, || measure_bf16(level))
}

/// The choice made for `family` at `level` in this process, else in the cache file, else
/// measured now (and written to the cache file).
fn remembered(level: Level, family: Family, measure: impl FnOnce() -> (Variant, Vec<(&'static str, f64)>)) -> Choice {
    static CHOICES: OnceLock<Mutex<HashMap<(Level, Family), Choice>>> = OnceLock::new();
    let mut known = CHOICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *known.entry((level, family)).or_insert_with(|| {
        let key = format!(
            "{} | {} | {} | zagreus {} | method {METHOD}",
            cpu_model(),
            level.name(),
            family.name(),
            env!("CARGO_PKG_VERSION")
        );
        // An entry naming kernels of another family (an edited file) is measured again.
        if let Some(variant) = read_cache(&key).filter(|v| family.runs(*v)) {
            return Choice {
                variant,
                reason: Reason::Cached,
            };
        }
        let (variant, timings) = measure();
        write_cache(&key, variant, &timings);
        Choice {
            variant,
            reason: Reason::Measured,
        }
    })
}

/// Formats that share kernels (Q4_0 and Q4_1 differ only in their offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    Q8,
    Q4,
    /// Q8_0 and Q4 in the fast precision: one-byte activations for the integer kernels.
    Q8Fast,
    Q4Fast,
    /// BF16 in the fast precision: BF16 dot products or f32 arithmetic.
    Bf16Fast,
}

impl Family {
    fn of(f: Format) -> Family {
        if f == Format::Q8_0 {
            Family::Q8
        } else {
            Family::Q4
        }
    }

    /// The same formats in the fast precision.
    fn fast(self) -> Family {
        match self {
            Family::Q8 | Family::Q8Fast => Family::Q8Fast,
            Family::Q4 | Family::Q4Fast => Family::Q4Fast,
            Family::Bf16Fast => Family::Bf16Fast,
        }
    }

    fn format(self) -> Format {
        match self {
            Family::Q8 | Family::Q8Fast => Format::Q8_0,
            Family::Q4 | Family::Q4Fast => Format::Q4_1,
            Family::Bf16Fast => Format::Bf16,
        }
    }

    /// Whether `variant` is one of this family's choices.
    fn runs(self, variant: Variant) -> bool {
        match self {
            Family::Bf16Fast => matches!(variant, Variant::Float | Variant::Bf16Dot),
            _ => variant != Variant::Bf16Dot,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::Q8 => "q8_0",
            Family::Q4 => "q4",
            Family::Q8Fast => "q8_0 fast",
            Family::Q4Fast => "q4 fast",
            Family::Bf16Fast => "bf16 fast",
        }
    }
}

/// A `rows x cols` matrix in `storage` filled with a fixed pattern, in its own arena.
fn matrix(storage: Storage, rows: usize, cols: usize) -> Option<(Arena, QMatrix)> {
    let mut arena = Arena::new(storage.arena_bytes(rows, cols) + 4096, Placement::Normal).ok()?;
    let m = QMatrix::alloc(&mut arena, storage, rows, cols).ok()?;
    m.fill_pattern(&mut arena);
    Some((arena, m))
}

/// Best of several runs of `m` rows through the matrix on one core, in microseconds. One core,
/// with the weights in its cache: what is compared is the kernels' own speed, not the memory's
/// or the other threads'.
fn time(level: Level, arena: &Arena, w: &QMatrix, m: usize) -> f64 {
    let x: Vec<f32> = (0..m * w.cols).map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5).collect();
    let mut out = vec![0f32; m * w.rows];
    let mut best = f64::INFINITY;
    for rep in 0..8 {
        let t = Instant::now();
        matmul_serial(level, arena, w, &x, m, &mut out);
        let us = t.elapsed().as_secs_f64() * 1e6;
        if rep >= 1 {
            best = best.min(us);
        }
    }
    best
}

/// Times decoding (one row) float against integer; if integer wins, prefill (32 rows) integer
/// against float-from-quads. About 10-30 ms in all. `precision` is the integer kernels'
/// (16-bit or one-byte activations).
fn measure(level: Level, format: Format, precision: Precision) -> (Variant, Vec<(&'static str, f64)>) {
    let run = |variant: Variant, rows: usize, m: usize| {
        matrix(Storage::new(format, variant).in_precision(precision), rows, 1024).map(|(a, w)| time(level, &a, &w, m))
    };
    let (Some(float), Some(int)) = (run(Variant::Float, 512, 1), run(Variant::Int, 512, 1)) else {
        return (Variant::Float, Vec::new());
    };
    let mut timings = vec![("decode_float_us", float), ("decode_int8_us", int)];
    if float <= int {
        return (Variant::Float, timings);
    }
    let (Some(pi), Some(pf)) = (run(Variant::Int, 256, 32), run(Variant::IntFloat, 256, 32)) else {
        return (Variant::Int, timings);
    };
    timings.extend([("prefill_int8_us", pi), ("prefill_float_us", pf)]);
    (if pi <= pf { Variant::Int } else { Variant::IntFloat }, timings)
}

/// Times 8 decoding rows (where the two differ most: the arithmetic, not the memory, is what
/// is compared) in f32 against BF16 dot products.
fn measure_bf16(level: Level) -> (Variant, Vec<(&'static str, f64)>) {
    let run =
        |variant: Variant| matrix(Storage::new(Format::Bf16, variant), 256, 1024).map(|(a, w)| time(level, &a, &w, 8));
    let (Some(float), Some(dot)) = (run(Variant::Float), run(Variant::Bf16Dot)) else {
        return (Variant::Float, Vec::new());
    };
    let variant = if dot < float { Variant::Bf16Dot } else { Variant::Float };
    (variant, vec![("rows8_float_us", float), ("rows8_bf16_dot_us", dot)])
}

fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("zagreus").join("kernels.json"))
}

/// Where measurements are kept (for messages).
pub fn cache_path() -> String {
    cache_file().map_or_else(|| "(no cache directory)".into(), |p| p.display().to_string())
}

fn read_all() -> serde_json::Map<String, serde_json::Value> {
    cache_file()
        .and_then(|p| std::fs::read(p).ok())
        .filter(|b| b.len() < 1 << 20)
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
}

fn read_cache(key: &str) -> Option<Variant> {
    read_all()
        .get(key)?
        .get("variant")?
        .as_str()
        .and_then(Variant::from_name)
}

/// Best effort: a cache that cannot be written only means measuring again next time.
fn write_cache(key: &str, variant: Variant, timings: &[(&str, f64)]) {
    let Some(path) = cache_file() else { return };
    let mut all = read_all();
    let mut entry = serde_json::Map::new();
    entry.insert("variant".into(), variant.name().into());
    for (k, v) in timings {
        entry.insert((*k).into(), ((v * 10.0).round() / 10.0).into());
    }
    all.insert(key.into(), entry.into());
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".kernels.json.{}", std::process::id()));
    let Ok(text) = serde_json::to_string_pretty(&serde_json::Value::Object(all)) else {
        return;
    };
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measuring_picks_a_variant_with_timings_for_each_option() {
        for level in Level::supported() {
            if level.isa == Isa::Portable {
                continue;
            }
            for precision in [Precision::Exact, Precision::Fast] {
                let (v, timings) = measure(level, Format::Q8_0, precision);
                assert!(timings.len() == 2 || timings.len() == 4, "{timings:?}");
                assert!(timings.iter().all(|(_, us)| us.is_finite() && *us > 0.0));
                let (float, int) = (timings[0].1, timings[1].1);
                assert_eq!(v == Variant::Float, float <= int, "{} {timings:?}", level.name());
            }
        }
    }

    #[test]
    fn the_fast_precision_applies_to_quantized_formats_where_bytes_are_dot_products() {
        for level in Level::supported() {
            for format in [Format::Q8_0, Format::Q4_0, Format::Bf16] {
                let fast = choose_fast_quantized(level, format);
                assert_eq!(
                    fast.is_some(),
                    format.quantized() && level.dot != Dot::None,
                    "{} {format:?}",
                    level.name()
                );
            }
        }
    }

    #[test]
    fn the_fast_bf16_kernels_are_chosen_by_timing_where_the_cpu_has_them() {
        for level in Level::supported() {
            if !level.bf16_dot() {
                assert_eq!(choose_fast_bf16(level).variant, Variant::Float, "{}", level.name());
                continue;
            }
            let (v, timings) = measure_bf16(level);
            assert_eq!(timings.len(), 2, "{timings:?}");
            assert!(timings.iter().all(|(_, us)| us.is_finite() && *us > 0.0));
            assert_eq!(
                v == Variant::Bf16Dot,
                timings[1].1 < timings[0].1,
                "{} {timings:?}",
                level.name()
            );
        }
    }
}
