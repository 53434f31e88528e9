//! What the CPU can do, detected once per process: the vector level the float kernels use and the
//! integer dot-product instruction the int8 kernels use.
//!
//! The binary is built for the target's baseline (x86-64 v1, plain AArch64) and picks its kernels
//! at run time, so one build runs on every CPU of its architecture. `ZAGREUS_ISA` forces a lower
//! level (for tests of the fallbacks and for measuring what a smaller CPU would get); a level the
//! CPU lacks is refused with a warning and the detected one is used.

use std::sync::OnceLock;

/// Vector level of the float kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F/BW/VL with FMA and F16C: 32 registers of 16 floats.
    Avx512,
    /// AVX2 with FMA and F16C: 16 registers of 8 floats.
    Avx2,
    /// AArch64 Advanced SIMD: 32 registers of 4 floats.
    Neon,
    /// Plain Rust (whatever the compiler vectorises for the baseline target).
    Portable,
}

/// The integer dot product the int8 kernels use (four byte products summed into each i32 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dot {
    /// No dot instruction: x86 combines `vpmaddubsw` and `vpmaddwd`, others use plain code.
    None,
    /// `vpdpbusd` at the level's width: AVX-512 VNNI (zmm) or AVX-VNNI (ymm).
    Vnni,
    /// AArch64 `sdot` (the dotprod extension).
    Dotprod,
}

/// Everything the kernels may use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Level {
    pub isa: Isa,
    pub dot: Dot,
}

impl Level {
    pub const PORTABLE: Level = Level {
        isa: Isa::Portable,
        dot: Dot::None,
    };

    /// The level in use: the best this CPU supports, or a lower one named by `ZAGREUS_ISA`.
    pub fn get() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let best = Self::best();
            match std::env::var("ZAGREUS_ISA") {
                Ok(name) if !name.is_empty() => match Self::from_name(&name) {
                    Some(l) if Self::supported().contains(&l) => l,
                    Some(_) => {
                        warn(&format!(
                            "ZAGREUS_ISA={name}: this CPU cannot run it; using {}",
                            best.name()
                        ));
                        best
                    }
                    None => {
                        let known: Vec<&str> = Self::all().iter().map(|l| l.name()).collect();
                        warn(&format!(
                            "ZAGREUS_ISA={name}: unknown level (known: {}); using {}",
                            known.join(", "),
                            best.name()
                        ));
                        best
                    }
                },
                _ => best,
            }
        })
    }

    /// Every level, best first.
    fn all() -> [Level; 7] {
        let l = |isa, dot| Level { isa, dot };
        [
            l(Isa::Avx512, Dot::Vnni),
            l(Isa::Avx512, Dot::None),
            l(Isa::Avx2, Dot::Vnni),
            l(Isa::Avx2, Dot::None),
            l(Isa::Neon, Dot::Dotprod),
            l(Isa::Neon, Dot::None),
            l(Isa::Portable, Dot::None),
        ]
    }

    /// Every level this CPU can run, best first (tests run each code path).
    pub fn supported() -> Vec<Level> {
        Self::all().into_iter().filter(|l| l.runs_here()).collect()
    }

    pub fn name(self) -> &'static str {
        match (self.isa, self.dot) {
            (Isa::Avx512, Dot::Vnni) => "avx512-vnni",
            (Isa::Avx512, _) => "avx512",
            (Isa::Avx2, Dot::Vnni) => "avx2-vnni",
            (Isa::Avx2, _) => "avx2",
            (Isa::Neon, Dot::Dotprod) => "neon-dotprod",
            (Isa::Neon, _) => "neon",
            (Isa::Portable, _) => "portable",
        }
    }

    pub fn from_name(name: &str) -> Option<Level> {
        Self::all().into_iter().find(|l| l.name() == name.trim())
    }

    fn best() -> Level {
        Self::all()
            .into_iter()
            .find(|l| l.runs_here())
            .unwrap_or(Self::PORTABLE)
    }

    /// Whether this level has BF16 dot products (`vdpbf16ps`: AVX-512 BF16), which the BF16
    /// kernels of the fast precision use.
    pub fn bf16_dot(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.isa == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn runs_here(self) -> bool {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        match (self.isa, self.dot) {
            (Isa::Avx512, Dot::Vnni) => avx512 && has!("avx512vnni"),
            (Isa::Avx512, Dot::None) => avx512,
            (Isa::Avx2, Dot::Vnni) => avx2 && has!("avxvnni"),
            (Isa::Avx2, Dot::None) => avx2,
            (Isa::Portable, Dot::None) => true,
            _ => false,
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn runs_here(self) -> bool {
        match (self.isa, self.dot) {
            (Isa::Neon, Dot::Dotprod) => std::arch::is_aarch64_feature_detected!("dotprod"),
            (Isa::Neon, Dot::None) | (Isa::Portable, Dot::None) => true,
            _ => false,
        }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn runs_here(self) -> bool {
        self == Self::PORTABLE
    }
}

impl Isa {
    /// The vector level in use (see `Level::get`).
    pub fn get() -> Isa {
        Level::get().isa
    }

    /// Every vector level this CPU can run, best first.
    pub fn supported() -> Vec<Isa> {
        let mut v: Vec<Isa> = Level::supported().into_iter().map(|l| l.isa).collect();
        v.dedup();
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }
}

/// A line on stderr (a failed write is not worth stopping for).
pub(crate) fn warn(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "zagreus: warning: {msg}");
}

/// The CPU's model name (`/proc/cpuinfo`), for keying measurements made on it.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "CPU part").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_best_level_comes_first() {
        for l in Level::all() {
            assert_eq!(Level::from_name(l.name()), Some(l));
        }
        let s = Level::supported();
        eprintln!("levels here: {:?}", s.iter().map(|l| l.name()).collect::<Vec<_>>());
        assert!(s.contains(&Level::PORTABLE));
        assert_eq!(s[0], Level::best());
    }
}
