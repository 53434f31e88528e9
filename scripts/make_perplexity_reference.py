#!/usr/bin/env python3
"""Records transformers' perplexity of the fixture models and the SmolLM2-135M-Instruct Q4_1 GGUF
on tests/fixtures/perplexity/sample.txt, with the windows `zagreus perplexity` uses, into
tests/fixtures/perplexity/reference.json. Not run in CI; its output is committed.

    pip install torch transformers gguf
    python3 scripts/make_perplexity_reference.py target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf

Both methods score token j+1 from the logits at j of a window run from scratch:
- llama.cpp: windows of ctx tokens at 0, ctx, 2ctx, ... (the first token replaced by BOS when the
  tokenizer adds one), positions ctx/2 .. ctx-2 scored;
- sliding: windows of ctx tokens every `stride`, each token scored once, in the first window
  that ends after it (tokens prev_end..end, not the window's own first token).
"""
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
text = open(os.path.join(root, "tests/fixtures/perplexity/sample.txt"), encoding="utf-8").read()


def nll_rows(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def llama_cpp(model, ids, ctx, bos):
    nlls = []
    for i in range(len(ids) // ctx):
        w = list(ids[i * ctx : (i + 1) * ctx])
        if bos is not None:
            w[0] = bos
        lp = nll_rows(model, w)
        for j in range(ctx // 2, ctx - 1):
            nlls.append(-float(lp[j, w[j + 1]]))
    return nlls


def sliding(model, ids, ctx, stride):
    nlls, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + ctx, len(ids))
        w = ids[begin:end]
        lp = nll_rows(model, w)
        for p in range(max(prev_end, begin + 1), end):
            nlls.append(-float(lp[p - begin - 1, ids[p]]))
        prev_end = end
        if end == len(ids):
            break
        begin += stride
    return nlls


def record(name, model, tok, runs):
    ids = tok(text)["input_ids"]
    bos = tok.bos_token_id if ids and ids[0] == tok.bos_token_id else None
    out = {"model": name, "tokens": len(ids), "first_ids": ids[:8], "runs": []}
    for method, ctx, stride in runs:
        nlls = llama_cpp(model, ids, ctx, bos) if method == "llama_cpp" else sliding(model, ids, ctx, stride)
        out["runs"].append({
            "method": method, "ctx": ctx, "stride": stride, "scored": len(nlls),
            "ppl": math.exp(sum(nlls) / len(nlls)),
        })
        print(name, out["runs"][-1], file=sys.stderr)
    return out


results = []
for name in ["tied-bf16", "untied-f32-sharded", "llama3-rope"]:
    d = os.path.join(root, "tests/fixtures/models", name)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    results.append(record(name, model, tok, [("llama_cpp", 64, None), ("sliding", 64, 24)]))

gguf = sys.argv[1]
folder, file = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
results.append(record("smollm2", model, tok, [("llama_cpp", 256, None), ("sliding", 512, 256)]))

with open(os.path.join(root, "tests/fixtures/perplexity/reference.json"), "w") as f:
    json.dump({"note": "made by scripts/make_perplexity_reference.py", "models": results}, f, indent=1)
    f.write("\n")
