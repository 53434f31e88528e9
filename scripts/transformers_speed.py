#!/usr/bin/env python3
"""transformers' decode and prefill speed on the Zagreus 0.4B shape (random weights, bf16) on the
GPU: the comparator of scripts/gpu-check.sh. Prefill of 128 tokens, then `generate` of 64 new
tokens (greedy, KV cache, EOS ignored), median of 5 runs after a warm-up."""
import argparse, json, statistics, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--prompt", type=int, default=128)
p.add_argument("--gen", type=int, default=64)
a = p.parse_args()

cfg = LlamaConfig(vocab_size=128256, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                  num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(dtype=torch.bfloat16, device="cuda").eval()
ids = torch.randint(0, 128000, (1, a.prompt), device="cuda")

def prefill():
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.no_grad():
        model(ids)
    torch.cuda.synchronize(); return a.prompt / (time.perf_counter() - t)

def decode():
    with torch.no_grad():
        torch.cuda.synchronize(); t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize(); first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=a.gen, min_new_tokens=a.gen, do_sample=False)
        torch.cuda.synchronize(); total = time.perf_counter() - t
    # Decode rate: the steps after the first token (prefill + first token timed separately).
    return (a.gen - 1) / max(total - first, 1e-9)

prefill(); decode()
res = {
    "device": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "prefill_tokens_per_s": statistics.median(prefill() for _ in range(5)),
    "decode_tokens_per_s": statistics.median(decode() for _ in range(5)),
}
json.dump(res, open(a.out, "w"), indent=1)
print(json.dumps(res))
