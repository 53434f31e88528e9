//! Writes GGUF files for tests: a fixture model's tensors in llama.cpp's layout (Q/K rows
//! permuted for its RoPE, GGML dimension order, F32/F16/Q8_0/Q4_0 blocks) and its tokenizer and
//! template as GGUF metadata, the way llama.cpp's converter does.

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ty {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl Ty {
    fn id(self) -> u32 {
        match self {
            Ty::F32 => 0,
            Ty::F16 => 1,
            Ty::Q4_0 => 2,
            Ty::Q8_0 => 8,
        }
    }
}

pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(out, key);
    match v {
        Meta::U32(x) => {
            out.extend(4u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::F32(x) => {
            out.extend(6u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::Bool(x) => {
            out.extend(7u32.to_le_bytes());
            out.push(*x as u8);
        }
        Meta::Str(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
        }
        Meta::Strs(v) => {
            out.extend(9u32.to_le_bytes());
            out.extend(8u32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            for s in v {
                put_str(out, s);
            }
        }
        Meta::I32s(v) => {
            out.extend(9u32.to_le_bytes());
            out.extend(5u32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            for x in v {
                out.extend(x.to_le_bytes());
            }
        }
    }
}

/// Row-major `rows x cols` f32 values encoded as GGML `ty` blocks.
fn encode(ty: Ty, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        Ty::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        Ty::F16 => values.iter().for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        Ty::Q8_0 => {
            for block in values.chunks(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let inv = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
                out.extend(d.to_le_bytes());
                out.extend(block.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
            }
        }
        Ty::Q4_0 => {
            for block in values.chunks(32) {
                let max = block.iter().fold(0f32, |a, v| if v.abs() > a.abs() { *v } else { a });
                let d = f16::from_f32(max / -8.0);
                let inv = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
                out.extend(d.to_le_bytes());
                let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
    }
    out
}

/// llama.cpp's permutation of Q/K rows: each head's rotary halves interleaved.
fn permute(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + j * half + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn read_tensor(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture lacks {name}"));
    let vals = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (t.shape().to_vec(), vals)
}

/// Writes `out` from fixture model `dir` (single-file safetensors), matrices in `ty`.
pub fn write_fixture_gguf(dir: &Path, out: &Path, ty: Ty) {
    write_fixture_gguf_with(dir, out, ty, |_| {});
}

/// [`write_fixture_gguf`] with the metadata changed by `edit` before it is written (hostile
/// files: a template that never ends, a NaN rope base, a zero width).
pub fn write_fixture_gguf_with(dir: &Path, out: &Path, ty: Ty, edit: impl FnOnce(&mut BTreeMap<String, Meta>)) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let n = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let (heads, kv_heads, layers) = (
        n("num_attention_heads") as usize,
        n("num_key_value_heads") as usize,
        n("num_hidden_layers"),
    );
    let mut meta: BTreeMap<String, Meta> = BTreeMap::new();
    meta.insert("general.architecture".into(), Meta::Str("llama".into()));
    meta.insert("general.name".into(), Meta::Str("zagreus fixture".into()));
    meta.insert("llama.block_count".into(), Meta::U32(layers));
    meta.insert("llama.context_length".into(), Meta::U32(n("max_position_embeddings")));
    meta.insert("llama.embedding_length".into(), Meta::U32(n("hidden_size")));
    meta.insert("llama.feed_forward_length".into(), Meta::U32(n("intermediate_size")));
    meta.insert("llama.attention.head_count".into(), Meta::U32(heads as u32));
    meta.insert("llama.attention.head_count_kv".into(), Meta::U32(kv_heads as u32));
    meta.insert(
        "llama.attention.layer_norm_rms_epsilon".into(),
        Meta::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
    );
    meta.insert(
        "llama.rope.freq_base".into(),
        Meta::F32(cfg["rope_theta"].as_f64().unwrap_or(10000.0) as f32),
    );
    // The tokenizer, as llama.cpp's converter writes a byte-level BPE one.
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let mut tokens: Vec<(u64, String, i32)> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap(), t.clone(), 1))
        .collect();
    for a in tok["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap();
        tokens.retain(|t| t.0 != id);
        tokens.push((
            id,
            a["content"].as_str().unwrap().to_string(),
            if a["special"].as_bool().unwrap() { 3 } else { 4 },
        ));
    }
    tokens.sort();
    let merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    meta.insert("tokenizer.ggml.model".into(), Meta::Str("gpt2".into()));
    meta.insert("tokenizer.ggml.pre".into(), Meta::Str("llama-bpe".into()));
    meta.insert(
        "tokenizer.ggml.tokens".into(),
        Meta::Strs(tokens.iter().map(|t| t.1.clone()).collect()),
    );
    meta.insert(
        "tokenizer.ggml.token_type".into(),
        Meta::I32s(tokens.iter().map(|t| t.2).collect()),
    );
    meta.insert("tokenizer.ggml.merges".into(), Meta::Strs(merges));
    meta.insert("tokenizer.ggml.bos_token_id".into(), Meta::U32(300));
    meta.insert("tokenizer.ggml.eos_token_id".into(), Meta::U32(303));
    meta.insert("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true));
    let tcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    if let Some(t) = tcfg["chat_template"].as_str() {
        meta.insert("tokenizer.chat_template".into(), Meta::Str(t.into()));
    }

    // Tensors: (gguf name, ggml dims, type, bytes).
    let mut tensors: Vec<(String, Vec<u64>, Ty, Vec<u8>)> = Vec::new();
    let mut matrix = |hf: &str, gguf: &str, perm: Option<usize>, ty: Ty| {
        let (shape, vals) = read_tensor(&st, hf);
        let (rows, cols) = (shape[0], shape[1]);
        let vals = match perm {
            Some(h) => permute(&vals, rows, cols, h),
            None => vals,
        };
        tensors.push((gguf.into(), vec![cols as u64, rows as u64], ty, encode(ty, &vals)));
    };
    // llama.cpp keeps the embedding in the file's type for Q8_0, and norms in F32.
    matrix(
        "model.embed_tokens.weight",
        "token_embd.weight",
        None,
        if ty == Ty::Q4_0 { Ty::Q8_0 } else { ty },
    );
    if st.tensor("lm_head.weight").is_ok() {
        matrix("lm_head.weight", "output.weight", None, ty);
    }
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        matrix(
            &format!("{p}.self_attn.q_proj.weight"),
            &format!("blk.{i}.attn_q.weight"),
            Some(heads),
            ty,
        );
        matrix(
            &format!("{p}.self_attn.k_proj.weight"),
            &format!("blk.{i}.attn_k.weight"),
            Some(kv_heads),
            ty,
        );
        matrix(
            &format!("{p}.self_attn.v_proj.weight"),
            &format!("blk.{i}.attn_v.weight"),
            None,
            ty,
        );
        matrix(
            &format!("{p}.self_attn.o_proj.weight"),
            &format!("blk.{i}.attn_output.weight"),
            None,
            ty,
        );
        matrix(
            &format!("{p}.mlp.gate_proj.weight"),
            &format!("blk.{i}.ffn_gate.weight"),
            None,
            ty,
        );
        matrix(
            &format!("{p}.mlp.up_proj.weight"),
            &format!("blk.{i}.ffn_up.weight"),
            None,
            ty,
        );
        matrix(
            &format!("{p}.mlp.down_proj.weight"),
            &format!("blk.{i}.ffn_down.weight"),
            None,
            ty,
        );
    }
    let mut vector = |hf: &str, gguf: &str| {
        let (shape, vals) = read_tensor(&st, hf);
        tensors.push((gguf.into(), vec![shape[0] as u64], Ty::F32, encode(Ty::F32, &vals)));
    };
    vector("model.norm.weight", "output_norm.weight");
    for i in 0..layers {
        vector(
            &format!("model.layers.{i}.input_layernorm.weight"),
            &format!("blk.{i}.attn_norm.weight"),
        );
        vector(
            &format!("model.layers.{i}.post_attention_layernorm.weight"),
            &format!("blk.{i}.ffn_norm.weight"),
        );
    }
    // Llama 3 rope scaling becomes per-dimension frequency factors, as llama.cpp's converter writes.
    if let Some(rs) = cfg["rope_scaling"]
        .as_object()
        .filter(|r| r.get("rope_type").and_then(|t| t.as_str()) == Some("llama3"))
    {
        let g = |k: &str| rs[k].as_f64().unwrap();
        let (factor, low, high, old) = (
            g("factor"),
            g("low_freq_factor"),
            g("high_freq_factor"),
            g("original_max_position_embeddings"),
        );
        let dim = cfg["hidden_size"].as_u64().unwrap() as usize / heads;
        let base = cfg["rope_theta"].as_f64().unwrap();
        let factors: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / base.powf(i as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor as f32
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        tensors.push((
            "rope_freqs.weight".into(),
            vec![factors.len() as u64],
            Ty::F32,
            encode(Ty::F32, &factors),
        ));
    }

    edit(&mut meta);
    let mut out_bytes = Vec::new();
    out_bytes.extend(b"GGUF");
    out_bytes.extend(3u32.to_le_bytes());
    out_bytes.extend((tensors.len() as u64).to_le_bytes());
    out_bytes.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_meta(&mut out_bytes, k, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in &tensors {
        put_str(&mut out_bytes, name);
        out_bytes.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out_bytes.extend(d.to_le_bytes());
        }
        out_bytes.extend(ty.id().to_le_bytes());
        out_bytes.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while out_bytes.len() % 32 != 0 {
        out_bytes.push(0);
    }
    for (_, _, _, data) in &tensors {
        out_bytes.extend(data);
        while out_bytes.len() % 32 != 0 {
            out_bytes.push(0);
        }
    }
    std::fs::write(out, out_bytes).unwrap();
}
