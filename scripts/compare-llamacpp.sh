#!/usr/bin/env bash
# zagreus against llama.cpp on the Zagreus 0.4B shape (random weights), back to back.
#
# Uses ../shared/tools/llamacpp-bench.sh to fetch llama.cpp (the source PyPI llama-cpp-python
# vendors), write the GGUFs and build it for this CPU (without AMX, whose Q8_0 path dies with an
# illegal instruction on VMs that report it). With ISA=avx2 both sides are held to AVX2: llama.cpp
# is built again with only AVX/AVX2/FMA/F16C (GGML_NATIVE=OFF) and zagreus runs with
# ZAGREUS_ISA=avx2, which is how a laptop or an AMD Zen 3 without AVX-512 is measured on an
# AVX-512 machine. Rounds alternate llama-bench and `zagreus bench` so that both see the same
# machine; shared hosts drift, so compare the ratios within a round and the medians over rounds.
#
# Usage: scripts/compare-llamacpp.sh [ROUNDS]
# Env: ISA=native|avx2 WORK=/tmp/llamacpp THREADS=2 BATCH=1 (batched decoding) EXTRA=1 (depth, pages, busy core)
#      PRECISION=exact|fast (zagreus' --precision; fast rounds activations as llama.cpp does: BF16 to BF16, Q8_0 to one byte)
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3} WORK=${WORK:-/tmp/llamacpp} THREADS=${THREADS:-2} ISA=${ISA:-native} PRECISION=${PRECISION:-exact}
TOOL=../shared/tools/llamacpp-bench.sh
[[ -x $TOOL ]] || { echo "compare-llamacpp: $TOOL not found" >&2; exit 1; }
WORK=$WORK REPS=1 PP=8 TG=4 "$TOOL" bf16 q8_0 >/dev/null || exit 1
case $ISA in
  native) LB=$WORK/build/bin/llama-bench; ZISA= ;;
  avx2)
    LB=$WORK/build-avx2/bin/llama-bench; ZISA=avx2
    if [[ ! -x $LB ]]; then
      cmake -S "$WORK/src" -B "$WORK/build-avx2" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null || exit 1
      cmake --build "$WORK/build-avx2" -j"$(nproc)" --target llama-bench llama-batched-bench >/dev/null || exit 1
    fi ;;
  *) echo "compare-llamacpp: ISA=$ISA: use native or avx2" >&2; exit 1 ;;
esac
cargo build --release --quiet || exit 1
Z=target/release/zagreus G=$WORK/gguf

# One line per test: "tool format test t/s".
llama() { "$LB" -m "$G/zagreus-$1.gguf" -t "$THREADS" "${@:2}" -o md 2>/dev/null |
  awk -F'|' -v f="$1" '$7 ~ /(pp|tg)/ {gsub(/ /,"",$7); split($8,a," "); print "llama.cpp", f, $7, a[1]}'; }
ours() { local f=$1; shift; ZAGREUS_ISA=$ZISA "$Z" bench --random zagreus-0.4b --precision "$PRECISION" "$@" 2>/dev/null |
  awk -F'|' -v f="$f" '$7 ~ /(pp|tg)/ {gsub(/ /,"",$7); split($8,a," "); print "zagreus", f, $7, a[1]; k=$5}
    END {if (k) print "# zagreus kernels:" k > "/dev/stderr"}'; }

results=$(mktemp)
trap 'rm -f "$results" "$results".[lz]' EXIT
echo "== ISA=$ISA, precision $PRECISION, $THREADS threads, $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  { llama bf16 -p 128 -n 64 -r 5; ours bf16 -p 128 -n 64 -r 5
    llama q8_0 -p 128 -n 64 -r 5; ours q8_0 --quantize q8_0 -p 128 -n 64 -r 5; } | sed "s/^/$r /" | tee -a "$results"
done
echo "== medians over rounds (ratio = zagreus / llama.cpp; per round in brackets)"
python3 - "$results" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, tool, fmt, test, tps = line.split()
    rows[(fmt, test)].setdefault(tool, {})[r] = float(tps)
for (fmt, test), v in rows.items():
    l, z = v.get("llama.cpp", {}), v.get("zagreus", {})
    per = [z[r] / l[r] for r in sorted(l) if r in z]
    if not per:
        continue
    print(f"{fmt} {test}: llama.cpp {statistics.median(l.values()):.1f}  zagreus {statistics.median(z.values()):.1f}  "
          f"ratio {statistics.median(per):.2f}  [{' '.join(f'{p:.2f}' for p in per)}]")
PY
if [[ ${BATCH:-1} == 1 ]]; then
  # Many sequences decoding together: llama-batched-bench's S_TG (aggregate decode t/s) against
  # `zagreus bench --batch`'s decode column, prompts of 128 tokens, 64 generated per sequence.
  BB=${LB%/llama-bench}/llama-batched-bench
  for f in bf16 q8_0; do
    q=; [[ $f == q8_0 ]] && q="--quantize q8_0"
    echo "== batched decoding, $f: sequences, llama.cpp t/s, zagreus t/s, ratio"
    # One after the other (never at the same time: they would share the cores).
    "$BB" -m "$G/zagreus-$f.gguf" -t "$THREADS" -c 4096 -b 2048 -ub 512 -npp 128 -ntg 64 -npl 1,2,4,8,16 2>/dev/null |
      awk -F'|' '$2 ~ /^ *128 *$/ {gsub(/ /,""); print $4, $9}' > "$results.l"
    ZAGREUS_ISA=$ZISA "$Z" bench --random zagreus-0.4b --precision "$PRECISION" $q -p 128 -n 64 -r 1 --batch 1,2,4,8,16 2>/dev/null |
      awk -F'|' '$9 ~ /[0-9]/ {gsub(/ /,"",$11); print $11}' > "$results.z"
    paste "$results.l" "$results.z" | awk '{printf "%s %s %s %.2f\n", $1, $2, $3, $3 / $2}'
  done
fi
[[ ${EXTRA:-1} == 1 ]] || exit 0
echo "== decode after 2048 tokens (bf16)"
llama bf16 -p 0 -n 64 -d 2048 -r 3
ours bf16 -p 0 -n 64 -d 2048 -r 3
echo "== weight pages: huge, then 4 KiB (bf16)"
ours bf16 -p 0 -n 64 -r 5 --placement huge
ours bf16 -p 0 -n 64 -r 5 --placement normal
echo "== another process busy on one core (bf16)"
(while :; do :; done) &
busy=$!
trap 'kill $busy 2>/dev/null; rm -f "$results"' EXIT
llama bf16 -p 128 -n 64 -r 3
ours bf16 -p 128 -n 64 -r 3
