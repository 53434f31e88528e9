#!/usr/bin/env bash
# Decode speed of one request while another request's 2048-token prompt is prefilled, against the
# same request alone, with `zagreus batch -P 2` on one model (a GGUF or a model directory).
#
# The long request is a `/v1/completions` body whose prompt is 2048 token ids and `max_tokens` 1;
# the short one is a few words with `max_tokens` 48 and `ignore_eos`, so it decodes while the long
# prompt runs. The speed is `timings.predicted_per_second` of the short request's result. Rounds
# alternate "both" and "alone" so both see the same machine; prints each round and the medians.
#
# Usage: scripts/interference.sh MODEL [ROUNDS]      e.g. /tmp/llamacpp/gguf/zagreus-q8_0.gguf
# Env: THREADS=2 TOKENS=48
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: scripts/interference.sh MODEL [ROUNDS]" >&2; exit 2; }
MODEL=$1 ROUNDS=${2:-3} THREADS=${THREADS:-2} TOKENS=${TOKENS:-48}
cargo build --release --quiet
Z=target/release/zagreus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp" "$TOKENS" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
short = {"custom_id": "short", "body": {"prompt": "Once upon a time, in a small town by the sea,",
         "max_tokens": n, "ignore_eos": True, "temperature": 0}}
long = {"custom_id": "long", "body": {"prompt": [100 + (i * 37) % 5000 for i in range(2048)],
        "max_tokens": 1, "temperature": 0}}
open(f"{out}/both.jsonl", "w").write(json.dumps(long) + "\n" + json.dumps(short) + "\n")
open(f"{out}/alone.jsonl", "w").write(json.dumps(short) + "\n")
PY
speed() {  # $1 = input; prints the short request's decode t/s and the run's seconds
  local t0 t1
  t0=$(date +%s.%N)
  "$Z" batch -m "$MODEL" -t "$THREADS" -P 2 "$1" 2>/dev/null >"$tmp/out.jsonl"
  t1=$(date +%s.%N)
  python3 - "$tmp/out.jsonl" "$t0" "$t1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("custom_id") == "short":
        t = r.get("timings") or r.get("response", {}).get("body", {}).get("timings")
        print(f'{t["predicted_per_second"]:.2f} {float(sys.argv[3]) - float(sys.argv[2]):.1f}')
PY
}
echo "== $MODEL, $THREADS threads, $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
ratios=()
for r in $(seq "$ROUNDS"); do
  read -r both wall < <(speed "$tmp/both.jsonl")
  read -r alone _ < <(speed "$tmp/alone.jsonl")
  ratio=$(python3 -c "print(f'{$both / $alone:.2f}')")
  ratios+=("$ratio")
  echo "round $r: beside the prompt $both t/s, alone $alone t/s, ratio $ratio (both requests took ${wall} s)"
done
python3 -c "import statistics, sys; print('median ratio', statistics.median(map(float, sys.argv[1:])))" "${ratios[@]}"
