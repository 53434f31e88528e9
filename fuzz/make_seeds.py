#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/seed-*): small valid inputs
that reach deep into each parser, from which libFuzzer mutates. Deterministic; run from the
repository root: python3 fuzz/make_seeds.py. Needs only the standard library."""

import json
import os
import random
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
rng = random.Random(7)


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- GGUF --------------------------------------------------------------------------------------

def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    """(type id, bytes) for a metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<B", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, gguf_str(v)
    if isinstance(v, list):
        inner = 8 if isinstance(v[0], str) else 5
        body = b"".join(gguf_str(x) if inner == 8 else struct.pack("<i", x) for x in v)
        return 9, struct.pack("<IQ", inner, len(v)) + body
    raise TypeError(v)


def f16(x):
    return struct.pack("<e", x)


def encode(ty, values):
    """GGML bytes of `values` (a whole number of blocks) in type `ty`."""
    if ty == 0:
        return b"".join(struct.pack("<f", x) for x in values)
    if ty == 1:
        return b"".join(f16(x) for x in values)
    if ty == 30:
        return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:] for x in values)
    out = b""
    for i in range(0, len(values), 32):
        blk = values[i:i + 32]
        amax = max(abs(x) for x in blk) or 1.0
        if ty == 8:  # Q8_0
            d = amax / 127
            out += f16(d) + bytes((round(x / d) & 0xFF) for x in blk)
        elif ty == 2:  # Q4_0
            d = amax / 8
            q = [min(15, max(0, round(x / d) + 8)) for x in blk]
            out += f16(d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
        elif ty == 3:  # Q4_1
            lo, hi = min(blk), max(blk)
            d = (hi - lo) / 15 or 1.0
            q = [min(15, max(0, round((x - lo) / d))) for x in blk]
            out += f16(d) + f16(lo) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
        elif ty == 6:  # Q5_0: scale, high bits, low nibbles (values arbitrary)
            out += f16(amax / 16) + bytes(rng.randrange(256) for _ in range(4 + 16))
        else:
            raise ValueError(ty)
    return out


def gguf(matrix_type, vocab=8, hidden=32, heads=2, kv_heads=1, ffn=32, layers=1, extra_meta=None, rope_freqs=False):
    head_dim = hidden // heads
    tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "<|im_end|>"][:vocab]
    meta = {
        "general.architecture": "llama",
        "general.name": "fuzz seed",
        "llama.block_count": layers,
        "llama.context_length": 64,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1, 1, 3][:vocab],
        "tokenizer.ggml.merges": ["a b", "Ġ a"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    }
    meta.update(extra_meta or {})
    rand = lambda n: [rng.uniform(-1, 1) for _ in range(n)]
    tensors = [("token_embd.weight", [hidden, vocab], matrix_type, rand(hidden * vocab)),
               ("output_norm.weight", [hidden], 0, [1.0] * hidden)]
    for i in range(layers):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", [hidden], 0, [1.0] * hidden),
            (p + "ffn_norm.weight", [hidden], 0, [1.0] * hidden),
            (p + "attn_q.weight", [hidden, hidden], matrix_type, rand(hidden * hidden)),
            (p + "attn_k.weight", [hidden, kv_heads * head_dim], matrix_type, rand(hidden * kv_heads * head_dim)),
            (p + "attn_v.weight", [hidden, kv_heads * head_dim], matrix_type, rand(hidden * kv_heads * head_dim)),
            (p + "attn_output.weight", [hidden, hidden], matrix_type, rand(hidden * hidden)),
            (p + "ffn_gate.weight", [hidden, ffn], matrix_type, rand(hidden * ffn)),
            (p + "ffn_up.weight", [hidden, ffn], matrix_type, rand(hidden * ffn)),
            (p + "ffn_down.weight", [ffn, hidden], matrix_type, rand(hidden * ffn)),
        ]
    if rope_freqs:
        tensors.append(("rope_freqs.weight", [head_dim // 2], 0, [1.0 + i for i in range(head_dim // 2)]))
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        ty, body = gguf_value(v)
        out += gguf_str(k) + struct.pack("<I", ty) + body
    datas, offset = [], 0
    for name, dims, ty, values in tensors:
        data = encode(ty, values)
        out += gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
        datas.append(data)
        offset += (len(data) + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for data in datas:
        out += data + b"\0" * (-len(data) % 32)
    return out


# --- safetensors -------------------------------------------------------------------------------

def safetensors(tensors, metadata=None):
    header, data = ({"__metadata__": metadata} if metadata else {}), b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    # Regenerate the seeds; keep the regression inputs fuzzing found (seed-regress-*).
    for target in os.listdir(CORPUS) if os.path.isdir(CORPUS) else []:
        for f in os.listdir(os.path.join(CORPUS, target)):
            if f.startswith("seed-") and not f.startswith("seed-regress-"):
                os.remove(os.path.join(CORPUS, target, f))
    small = {"hidden": 8, "ffn": 16}
    write("gguf", "f32", gguf(0, **small))
    write("gguf", "f16-rope-freqs", gguf(1, rope_freqs=True, **small))
    write("gguf", "q8_0", gguf(8))
    write("gguf", "q4_0-gqa", gguf(2, heads=4, kv_heads=2))
    write("gguf", "q4_1", gguf(3))
    write("gguf", "q5_0-linear-rope", gguf(6, extra_meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}))
    write("gguf", "bf16", gguf(30, **small))

    f32 = lambda n: b"".join(struct.pack("<f", rng.uniform(-1, 1)) for _ in range(n))
    bf16 = lambda n: b"".join(struct.pack("<f", rng.uniform(-1, 1))[2:] for _ in range(n))
    f16s = lambda n: b"".join(f16(rng.uniform(-1, 1)) for _ in range(n))
    write("safetensors", "model", safetensors([
        ("model.embed_tokens.weight", "BF16", [8, 16], bf16(128)),
        ("model.norm.weight", "F32", [16], f32(16)),
        ("model.layers.0.self_attn.q_proj.weight", "F16", [16, 16], f16s(256)),
    ]))
    write("safetensors", "empty-tensor", safetensors([("x", "F32", [0, 4], b""), ("y", "F32", [2], f32(2))]))
    write("safetensors", "metadata", safetensors([("w", "F32", [2, 2], f32(4))], {"format": "pt"}))

    write("safetensors_index", "two-shards", json.dumps({
        "metadata": {"total_size": 1234},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                       "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    write("safetensors_index", "one", '{"weight_map":{"a":"m.safetensors"}}')

    for d in sorted(os.listdir(os.path.join(FIXTURES, "models"))):
        for f in ["config.json", "generation_config.json", "tokenizer_config.json"]:
            p = os.path.join(FIXTURES, "models", d, f)
            if os.path.exists(p):
                write("config", f"{d}-{f}", open(p, "rb").read())
    write("config", "transformers5", json.dumps({
        "model_type": "llama", "vocab_size": 128262, "hidden_size": 960, "intermediate_size": 2560,
        "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "bfloat16",
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128256]}))

    for f in sorted(os.listdir(os.path.join(FIXTURES, "templates"))):
        if f.endswith(".jinja"):
            write("template", f, open(os.path.join(FIXTURES, "templates", f), "rb").read())
    write("template", "loops", "{% set ns = namespace(s='') %}{% for m in messages %}{% for t in tools %}"
          "{% set ns.s = ns.s ~ m.role ~ (t | tojson) %}{% endfor %}{% endfor %}{{ ns.s | length }}"
          "{{ messages[2].tool_calls[0].function.arguments | tojson(indent=2) }}{{ 'x'.upper().split('X') }}"
          "{{ raise_exception('stop') if messages | length > 9 }}{{ strftime_now('%Y') }}")
    write("template", "macros", "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{{ n }}{% endmacro %}"
          "{{ f(5) }}{% for m in messages|reverse %}{{ loop.index0 }}{{ m.content[:3]|trim }}{% endfor %}")

    for i, text in enumerate([
        "Ciao! Come stai? 😀 Perché no? Un caffè 🇮🇹, grazie!",
        "<|begin_of_text|><|im_start|>user\nCiao<|im_end|>\n<|im_start|>assistant\n",
        "  spazi   e\ttab\n\nrighe   ",
        "12345 67.89 l'italiano è bello",
    ]):
        # The first 32 bytes are token ids to stream, the rest text to encode.
        write("tokenizer", f"text{i}", bytes(rng.randrange(256) for _ in range(32)) + text.encode())
    write("tokenizer", "ids", bytes(rng.randrange(256) for _ in range(32)) + "ab".encode())

    for i, s in enumerate(["main", "refs/pr/1", "v1.0", "0123456789abcdef0123456789abcdef01234567",
                           '"' + "a" * 64 + '"', "W/\"" + "b" * 40 + "\"", "model-00001-of-00002.safetensors",
                           "../../x", "a/../b", "x.lock"]):
        write("hub_names", f"{i}", s)

    requests = [
        {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Ciao"}]}],
                  "max_tokens": 64, "temperature": 0, "stop": ["\n"], "logprobs": True, "top_logprobs": 2}},
        {"custom_id": "q2", "url": "/v1/completions", "body": {"prompt": "La capitale d'Italia è", "max_tokens": 8, "logprobs": 1, "seed": 3}},
        {"messages": [{"role": "user", "content": "x"}], "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
         "repetition_penalty": 1.1, "n": 1},
        {"prompt": ["uno"], "stop": "END", "ignore_eos": True, "max_completion_tokens": 5},
        {"messages": [{"role": "user", "content": "Meteo?"},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                       "function": {"name": "meteo", "arguments": "{\"citta\": \"Roma\"}"}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "21"}],
         "tools": [{"type": "function", "function": {"name": "meteo", "parameters": {"type": "object",
                    "properties": {"citta": {"type": "string"}}, "required": ["citta"]}}}],
         "tool_choice": {"type": "function", "function": {"name": "meteo"}}, "parallel_tool_calls": False},
        {"messages": [{"role": "user", "content": "JSON"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    ]
    for i, r in enumerate(requests):
        write("requests", f"{i}", json.dumps(r) + "\n")
    write("requests", "lines", "\n".join(json.dumps(r) for r in requests) + "\nnot json\n" + json.dumps(requests[0]) + "\n")

    # Model answers with tool calls: the first byte sets the streaming chunk size.
    write("tool_calls", "two-calls", b"\x03" + 'Vediamo. <tool_call>\n{"name": "a", "arguments": {"q": "\u00e8"}}\n</tool_call>\n'
          '<tool_call>{"name": "b", "arguments": "{}"}</tool_call>'.encode())
    write("tool_calls", "cut", b"\x01" + b'<tool_call>\n{"name": "meteo", "argu')
    write("tool_calls", "nested", b"\x05" + b'a < b <tool_call> <tool_call>{"name": 1}</tool_call></tool_call>')


if __name__ == "__main__":
    main()
