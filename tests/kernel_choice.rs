//! Which kernels run, as a user sees it in `zagreus bench`: measured once per CPU and cached,
//! forced with `ZAGREUS_KERNEL`, and a lower instruction level with `ZAGREUS_ISA`.

use std::process::Command;

use assert_cmd::cargo::cargo_bin;

/// `zagreus bench` on a small random Q8_0 model; returns the `kernels` field and stderr.
fn bench_kernels(env: &[(&str, &str)]) -> (String, String) {
    bench_with(&["--quantize", "q8_0"], env)
}

/// `zagreus bench` on a small random model with `args`; returns the `kernels` field and stderr.
fn bench_with(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut c = Command::new(cargo_bin("zagreus"));
    c.args([
        "bench",
        "--random",
        "smollm2-135m",
        "-p",
        "4",
        "-n",
        "2",
        "-r",
        "1",
        "--json",
    ])
    .args(args)
    .env_remove("ZAGREUS_KERNEL")
    .env_remove("ZAGREUS_ISA");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (j[0]["kernels"].as_str().unwrap().to_string(), stderr)
}

#[test]
fn the_choice_is_measured_once_cached_and_can_be_forced() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let (first, _) = bench_kernels(&[("XDG_CACHE_HOME", dir)]);
    // A CPU without SIMD kernels keeps the float ones without measuring.
    if !first.starts_with("portable") {
        assert!(first.contains("measured on this CPU"), "{first}");
        let file = cache.path().join("zagreus/kernels.json");
        let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let entry = saved
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.contains("q8_0"))
            .unwrap()
            .1;
        let variant = entry["variant"].as_str().unwrap();
        assert!(first.contains(variant), "{first} vs {variant}");
        assert!(entry["decode_float_us"].as_f64().unwrap() > 0.0);
        let (second, _) = bench_kernels(&[("XDG_CACHE_HOME", dir)]);
        assert!(second.contains("measured earlier on this CPU"), "{second}");
        assert!(second.contains(variant), "{second}");
        // An edited file naming another family's kernels is not believed: measured again.
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            &file,
            text.replace(&format!("\"variant\": \"{variant}\""), "\"variant\": \"bf16-dot\""),
        )
        .unwrap();
        assert!(std::fs::read_to_string(&file).unwrap().contains("bf16-dot"));
        let (third, _) = bench_kernels(&[("XDG_CACHE_HOME", dir)]);
        assert!(
            third.contains("measured on this CPU") && !third.contains("bf16-dot"),
            "{third}"
        );
    }
    for forced in ["float", "int8", "int8+float"] {
        let (k, _) = bench_kernels(&[("XDG_CACHE_HOME", dir), ("ZAGREUS_KERNEL", forced)]);
        assert!(k.contains(&format!("{forced} (forced by ZAGREUS_KERNEL)")), "{k}");
    }
}

#[test]
fn a_lower_instruction_level_can_be_chosen_and_an_unknown_one_is_reported() {
    let (best, _) = bench_kernels(&[("ZAGREUS_KERNEL", "int8")]);
    if best.starts_with("avx512") || best.starts_with("avx2") {
        let (k, _) = bench_kernels(&[("ZAGREUS_ISA", "avx2"), ("ZAGREUS_KERNEL", "int8")]);
        assert!(k.starts_with("avx2, "), "{k}");
    }
    let (k, _) = bench_kernels(&[("ZAGREUS_ISA", "portable"), ("ZAGREUS_KERNEL", "float")]);
    assert!(k.starts_with("portable, "), "{k}");
    let (k, stderr) = bench_kernels(&[("ZAGREUS_ISA", "sse9"), ("ZAGREUS_KERNEL", "float")]);
    assert_eq!(k, best.replace("int8", "float"));
    assert!(
        stderr.contains("ZAGREUS_ISA=sse9: unknown level") && stderr.contains("portable"),
        "{stderr}"
    );
}

#[test]
fn the_fast_precision_says_what_it_runs() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let (fast, _) = bench_with(&["--precision", "fast"], &[("XDG_CACHE_HOME", dir)]);
    // BF16 dot products where the CPU has them and they were faster, else exact, said so.
    assert!(
        fast.contains("bf16-dot (measured on this CPU), fast precision")
            || fast.ends_with(", exact: BF16 dot products were slower on this CPU")
            || fast.ends_with(", exact: no BF16 dot products at this level"),
        "{fast}"
    );
    if fast.starts_with("avx512") || fast.starts_with("avx2") {
        let (avx2, _) = bench_with(
            &["--precision", "fast"],
            &[("XDG_CACHE_HOME", dir), ("ZAGREUS_ISA", "avx2")],
        );
        assert!(avx2.ends_with("exact: no BF16 dot products at this level"), "{avx2}");
    }
    let (q8, _) = bench_with(
        &["--precision", "fast", "--quantize", "q8_0"],
        &[("XDG_CACHE_HOME", dir)],
    );
    // Q8_0: one-byte activations where the integer kernels run on byte dot products (timed
    // apart from the exact precision's choice), said so; exact elsewhere, said why.
    assert!(
        q8.contains("fast precision: 8-bit activations")
            || q8.ends_with("exact: the float kernels were faster on this CPU")
            || q8.ends_with("exact: no byte dot products at this level"),
        "{q8}"
    );
    assert_eq!(
        q8.starts_with("avx512-vnni") || q8.starts_with("avx2-vnni") || q8.starts_with("neon-dotprod"),
        !q8.ends_with("exact: no byte dot products at this level"),
        "{q8}"
    );
    if q8.contains("fast precision") {
        let file = cache.path().join("zagreus/kernels.json");
        let saved = std::fs::read_to_string(file).unwrap();
        assert!(saved.contains("| q8_0 fast |"), "{saved}");
    }
    if q8.starts_with("avx512") {
        let (avx2, _) = bench_with(
            &["--precision", "fast", "--quantize", "q8_0"],
            &[("XDG_CACHE_HOME", dir), ("ZAGREUS_ISA", "avx2")],
        );
        assert!(
            avx2.contains("fast precision") || avx2.ends_with("exact: no byte dot products at this level"),
            "{avx2}"
        );
    }
    let (f32s, _) = bench_with(&["--precision", "fast", "--dtype", "f32"], &[("XDG_CACHE_HOME", dir)]);
    assert!(
        f32s.ends_with("exact: the fast precision is for BF16 and quantized weights"),
        "{f32s}"
    );
    let (exact, _) = bench_with(&[], &[("XDG_CACHE_HOME", dir)]);
    assert!(!exact.contains("precision"), "{exact}");
    // Where the products run in the fast precision, keys and values are kept in BF16 too, and
    // the column says so; where it computes exactly, so does attention (f32 keys and values).
    for column in [&fast, &q8, &f32s, &exact] {
        assert_eq!(
            column.contains(", fast precision"),
            column.ends_with(", BF16 KV cache"),
            "{column}"
        );
    }
    let out = Command::new(cargo_bin("zagreus"))
        .args(["bench", "--random", "smollm2-135m", "--precision", "fastest"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--precision") && err.contains("fastest"), "{err}");
}
