#!/usr/bin/env bash
# Wall time of `zagreus batch` over N chat requests against N one-shot runs one after the other,
# on one model (a GGUF or a model directory). Each request is a different question, TOKENS
# generated tokens with `ignore_eos` at temperature 0, so both sides generate the same count.
#
# Usage: scripts/batch-vs-oneshot.sh MODEL      e.g. /tmp/llamacpp/gguf/zagreus-bf16.gguf
# Env: N=64 PARALLEL=16 TOKENS=32 THREADS=2
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: scripts/batch-vs-oneshot.sh MODEL" >&2; exit 2; }
MODEL=$1 N=${N:-64} PARALLEL=${PARALLEL:-16} TOKENS=${TOKENS:-32} THREADS=${THREADS:-2}
cargo build --release --quiet
Z=target/release/zagreus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp" "$N" "$TOKENS" <<'PY'
import json, sys
out, n, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
topics = ["the sea", "Rome", "bread", "a violin", "winter", "the moon", "a library", "coffee"]
with open(f"{out}/requests.jsonl", "w") as f, open(f"{out}/questions.txt", "w") as q:
    for i in range(n):
        text = f"Question {i}: write two sentences about {topics[i % len(topics)]}."
        f.write(json.dumps({"custom_id": f"q{i}", "messages": [{"role": "user", "content": text}],
                            "max_tokens": tokens, "ignore_eos": True, "temperature": 0}) + "\n")
        q.write(text + "\n")
PY
echo "== $MODEL, $N requests of $TOKENS tokens, $THREADS threads, load $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s.%N)
"$Z" batch -m "$MODEL" -t "$THREADS" -P "$PARALLEL" "$tmp/requests.jsonl" >"$tmp/out.jsonl" 2>/dev/null
t1=$(date +%s.%N)
ok=$(grep -c '"error":null' "$tmp/out.jsonl" || true)
[[ $(wc -l <"$tmp/out.jsonl") -eq $N ]] || { echo "batch: expected $N results" >&2; exit 1; }
while IFS= read -r q; do
  "$Z" -m "$MODEL" -t "$THREADS" -n "$TOKENS" --ignore-eos --temperature 0 "$q" </dev/null >/dev/null 2>&1
done <"$tmp/questions.txt"
t2=$(date +%s.%N)
python3 -c "
b, s = $t1 - $t0, $t2 - $t1
print(f'batch -P $PARALLEL: {b:.1f} s ($ok of $N without an error record); one-shot runs: {s:.1f} s; ratio {b / s:.2f}')"
