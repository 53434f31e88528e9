#!/usr/bin/env bash
# `zagreus perplexity` against llama.cpp's llama-perplexity on the same GGUF, text and windows,
# back to back: the perplexity each computes and the tokens per second each runs (model loading
# excluded: llama-perplexity's "seconds per pass" times its passes, zagreus' own figure).
#
# Usage: scripts/compare-perplexity.sh [ROUNDS]
# Env: MODEL=target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf TEXT=tests/fixtures/perplexity/sample.txt
#      CTX=256 THREADS=2 WORK=/tmp/llamacpp (llama-perplexity from ../shared/tools/llamacpp-bench.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3} WORK=${WORK:-/tmp/llamacpp} THREADS=${THREADS:-2} CTX=${CTX:-256}
MODEL=${MODEL:-target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-tests/fixtures/perplexity/sample.txt}
LP=$WORK/build/bin/llama-perplexity
if [[ ! -x $LP ]]; then
  WORK=$WORK REPS=1 PP=8 TG=4 ../shared/tools/llamacpp-bench.sh bf16 >/dev/null || exit 1
fi
[[ -f $MODEL ]] || scripts/fetch-test-assets.sh >/dev/null || exit 1
cargo build --release --quiet || exit 1
echo "== $MODEL on $TEXT, windows of $CTX, $THREADS threads"
for r in $(seq "$ROUNDS"); do
  "$LP" -m "$MODEL" -f "$TEXT" -c "$CTX" -t "$THREADS" 2>&1 | python3 -c '
import math, re, sys
t = sys.stdin.read()
n, ctx, seq = map(int, re.search(r"over (\d+) chunks, n_ctx=(\d+), batch_size=\d+, n_seq=(\d+)", t).groups())
secs = float(re.search(r"([\d.]+) seconds per pass", t).group(1)) * math.ceil(n / seq)
ppl = re.search(r"Final estimate: PPL = ([\d.]+)", t).group(1)
print(f"'"$r"' llama-perplexity ppl {ppl} tokens/s {n * ctx / secs:.1f}")'
  target/release/zagreus perplexity -m "$MODEL" -f "$TEXT" --ctx-size "$CTX" --threads "$THREADS" --json 2>/dev/null |
    python3 -c 'import json, sys; r = json.load(sys.stdin); print("%s zagreus ppl %.4f tokens/s %.1f" % (sys.argv[1], r["ppl"], r["tokens_per_second"]))' "$r"
done
