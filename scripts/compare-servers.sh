#!/usr/bin/env bash
# `zagreus serve` against llama.cpp's llama-server under the same bounded load, back to back:
# the same GGUF, the same number of sequences at once (-np / --parallel), the same clients
# (scripts/load-test.py: every client sends its requests one after the other, each streamed,
# with a fixed number of generated tokens). Rounds alternate the servers; compare ratios.
#
# Usage: scripts/compare-servers.sh [ROUNDS]
# Env: MODEL=target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf NP=4 CLIENTS=8 REQUESTS=4
#      MAX_TOKENS=64 PROMPT_WORDS=50 THREADS=2 WORK=/tmp/llamacpp (llama-server from
#      ../shared/tools/llamacpp-bench.sh, built there if missing)
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3} WORK=${WORK:-/tmp/llamacpp} THREADS=${THREADS:-2} NP=${NP:-4}
MODEL=${MODEL:-target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
LOAD=(--clients "${CLIENTS:-8}" --requests "${REQUESTS:-4}" --max-tokens "${MAX_TOKENS:-64}"
      --prompt-words "${PROMPT_WORDS:-50}" --limit 900 --json)
LS=$WORK/build/bin/llama-server
if [[ ! -x $LS ]]; then
  WORK=$WORK REPS=1 PP=8 TG=4 ../shared/tools/llamacpp-bench.sh bf16 >/dev/null || exit 1
fi
[[ -f $MODEL ]] || scripts/fetch-test-assets.sh >/dev/null || exit 1
cargo build --release --quiet || exit 1
port=$((20000 + RANDOM % 20000))

run() { # name command...
  local name=$1; shift
  "$@" >/dev/null 2>&1 &
  local pid=$!
  local out; out=$(python3 scripts/load-test.py "http://127.0.0.1:$port" "${LOAD[@]}")
  kill "$pid"; wait "$pid" 2>/dev/null
  echo "$name $out"
}

results=$(mktemp); trap 'rm -f "$results"' EXIT
echo "== $MODEL, $THREADS threads, $NP sequences at once, load: ${LOAD[*]}"
for r in $(seq "$ROUNDS"); do
  run llama-server "$LS" -m "$MODEL" --host 127.0.0.1 --port "$port" -np "$NP" -c $((NP * 2048)) -t "$THREADS" | tee -a "$results"
  run zagreus target/release/zagreus serve -m "$MODEL" --port "$port" --parallel "$NP" --ctx-size 2048 --threads "$THREADS" | tee -a "$results"
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    rows.setdefault(name, []).append(json.loads(js))
keys = ["requests_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "generated_tokens_per_s"]
print("== medians over rounds")
print("| server | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in rows.items()}
for n, m in med.items():
    print(f"| {n} | " + " | ".join(f"{m[k]:g}" for k in keys) + " |")
if "zagreus" in med and "llama-server" in med:
    z, l = med["zagreus"], med["llama-server"]
    print(f"requests/s ratio zagreus / llama-server: {z['requests_per_s'] / l['requests_per_s']:.2f}; "
          f"p50 latency ratio: {z['latency_p50_s'] / l['latency_p50_s']:.2f}; "
          f"p50 TTFT ratio: {z['ttft_p50_s'] / l['ttft_p50_s']:.2f}")
PY
