#!/usr/bin/env bash
# The GPU check, in one call, on a machine with an NVIDIA GPU (no Rust needed there):
#   1. the cuda build's libraries resolve (ldd), with the machine's CUDA 13 libraries found;
#   2. logits on the GPU against transformers' f32 references (tests/fixtures), in f32 and bf16;
#   3. the one-shot and pipe front ends on the GPU; `zagreus batch` (the same answers alone or
#      batched, greedy and seeded) and `bench --batch`;
#   4. `zagreus bench` on the Zagreus shape (random weights) in bf16 on the GPU, beside
#      transformers' `generate` on the same GPU, same shape, same run (torch + transformers needed).
#
#   cargo build --release --features cuda    # on a build machine (scripts/cuda-build-env.sh)
#   scripts/gpu-check.sh target/release/zagreus [OUT_DIR]
#
# Prints a summary; writes bench.json, transformers.json and gpu-check.log into OUT_DIR.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin=${1:-$here/target/release/zagreus}
out=${2:-${OUT:-/tmp/zagreus-gpu-check}}
mkdir -p "$out"
log=$out/gpu-check.log
: >"$log"
say() { echo "$@" | tee -a "$log"; }
fail=0

say "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"

# CUDA 13 runtime libraries: the system toolkit, or the ones torch ships.
if ldd "$bin" | grep -q "not found"; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null) \
    $(find / -name 'libcublas.so.13*' -printf '%h\n' 2>/dev/null | sort -u); do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
fi
say "== ldd"
ldd "$bin" | grep -E "cuda|cublas|curand|nvrtc|not found" | tee -a "$log"
if ldd "$bin" | grep -q "not found"; then
  say "FAIL: libraries missing"
  exit 1
fi

say "== logits against transformers (f32 references)"
for m in tied-bf16 untied-f32-sharded llama3-rope; do
  dir=$here/tests/fixtures/models/$m
  "$bin" check-logits -m "$dir" --reference "$dir/reference.json" --device cuda --dtype f32 --tolerance 2e-3 2>&1 | tee -a "$log" || fail=1
  "$bin" check-logits -m "$dir" --reference "$dir/reference.json" --device cuda --dtype bf16 --tolerance 0.25 2>&1 | tee -a "$log" || fail=1
done

say "== front ends on the GPU"
fixture=$here/tests/fixtures/models/tied-bf16
"$bin" -m "$fixture" --device cuda --temperature 0 -n 8 --verbose "Ciao!" 2>&1 | tee -a "$log" || fail=1
echo "Un testo da riassumere." | "$bin" -m "$fixture" --device cuda --temperature 0 -n 8 --json "Riassumi." 2>&1 | tee -a "$log" || fail=1

say "== zagreus batch on the GPU: each answer the same alone (-P 1) or batched (-P 16)"
python3 - >"$out/requests.jsonl" <<'PY'
import json
prompts = ["Ciao!", "Qual è la capitale d'Italia?", "Write a haiku about the sea.",
           "1 2 3 4 5 6 7 8", "Traduci: the cat sleeps.", "Hi",
           "Elenca tre colori.", "?"]
for i, p in enumerate(prompts):
    msgs = [{"role": "user", "content": p}]
    print(json.dumps({"custom_id": f"greedy-{i}", "body": {"messages": msgs, "max_tokens": 16, "temperature": 0}}))
    print(json.dumps({"custom_id": f"seeded-{i}", "body": {"messages": msgs, "max_tokens": 16, "temperature": 0.9, "seed": 7 + i}}))
PY
for dtype in f32 bf16; do
  for p in 1 16; do
    "$bin" batch -m "$fixture" --device cuda --dtype "$dtype" -P "$p" "$out/requests.jsonl" >"$out/batch-$dtype-$p.jsonl" 2>>"$log" || fail=1
  done
  python3 - "$out/batch-$dtype-1.jsonl" "$out/batch-$dtype-16.jsonl" "$dtype" <<'PY' 2>&1 | tee -a "$log" || fail=1
import json, sys
def answers(path):
    rows = [json.loads(line) for line in open(path)]
    return [(r["custom_id"], r["response"]["body"]["choices"][0]["message"]["content"],
             r["response"]["body"]["choices"][0]["finish_reason"],
             r["response"]["body"]["usage"]["completion_tokens"]) for r in rows]
alone, batched = answers(sys.argv[1]), answers(sys.argv[2])
assert len(alone) == 16, f"{len(alone)} results, not 16"
diff = [a[0] for a, b in zip(alone, batched) if a != b]
print(f"{sys.argv[3]}: {len(alone) - len(diff)}/{len(alone)} answers identical alone and batched" + (f"; differ: {diff}" if diff else ""))
sys.exit(1 if diff else 0)
PY
done

say "== zagreus bench --batch, Zagreus shape, bf16, GPU (up to 16 decoding sequences share a pass)"
"$bin" bench --random zagreus-0.4b --device cuda --dtype bf16 -p 128 -n 32 -r 1 --batch 1,4,16,32 2>&1 | tee -a "$log" || fail=1

say "== zagreus bench, Zagreus shape, bf16, GPU"
"$bin" bench --random zagreus-0.4b --device cuda --dtype bf16 -p 128 -n 64 -r 5 --json >"$out/bench.json" 2>>"$log" || fail=1
"$bin" bench --random zagreus-0.4b --device cuda --dtype bf16 -p 128 -n 64 -r 5 2>&1 | tee -a "$log"

say "== transformers generate, same shape, bf16, same GPU"
python3 "$here/scripts/transformers_speed.py" --out "$out/transformers.json" 2>&1 | tee -a "$log" || fail=1

python3 - "$out" <<'PY' 2>&1 | tee -a "$log"
import json, sys
out = sys.argv[1]
ours = {m["test"]: m["tokens_per_s"] for m in json.load(open(f"{out}/bench.json"))}
tf = json.load(open(f"{out}/transformers.json"))
print(f"decode: zagreus {ours['tg64']:.1f} t/s vs transformers {tf['decode_tokens_per_s']:.1f} t/s = {ours['tg64'] / tf['decode_tokens_per_s']:.2f}x")
print(f"prefill: zagreus {ours['pp128']:.1f} t/s vs transformers {tf['prefill_tokens_per_s']:.1f} t/s = {ours['pp128'] / tf['prefill_tokens_per_s']:.2f}x")
PY
[ "$fail" = 0 ] && say "GPU check passed" || say "GPU check FAILED"
exit "$fail"
