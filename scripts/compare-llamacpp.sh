#!/usr/bin/env bash
# zagreus against llama.cpp on the Zagreus 0.4B shape (random weights), back to back.
#
# Uses ../shared/tools/llamacpp-bench.sh to fetch llama.cpp (the source PyPI llama-cpp-python
# vendors), write the GGUFs and build it; adds a build without AMX (whose Q8_0 path dies with an
# illegal instruction on VMs that report AMX), then alternates llama-bench and `zagreus bench` so
# that both see the same machine. Shared hosts drift: compare the ratios within a round.
#
# Usage: scripts/compare-llamacpp.sh [ROUNDS]      Env: WORK=/tmp/llamacpp THREADS=2
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2} WORK=${WORK:-/tmp/llamacpp} THREADS=${THREADS:-2}
TOOL=../shared/tools/llamacpp-bench.sh
[[ -x $TOOL ]] || { echo "compare-llamacpp: $TOOL not found" >&2; exit 1; }
WORK=$WORK REPS=1 PP=8 TG=4 "$TOOL" bf16 q8_0 >/dev/null || exit 1
LB=$WORK/build-noamx/bin/llama-bench
if [[ ! -x $LB ]]; then
  cmake -S "$WORK/src" -B "$WORK/build-noamx" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON \
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF >/dev/null || exit 1
  cmake --build "$WORK/build-noamx" -j"$(nproc)" --target llama-bench >/dev/null || exit 1
fi
cargo build --release --quiet || exit 1
Z=target/release/zagreus G=$WORK/gguf

llama() { "$LB" -m "$G/zagreus-$1.gguf" -t "$THREADS" "${@:2}" -o md 2>/dev/null | grep -E '\| +(pp|tg)'; }
ours() { "$Z" bench --random zagreus-0.4b "$@" 2>/dev/null | grep -E '\| (pp|tg)'; }

for r in $(seq "$ROUNDS"); do
  echo "== round $r"
  llama bf16 -p 128 -n 64 -r 5
  ours -p 128 -n 64 -r 5
  llama q8_0 -p 128 -n 64 -r 5
  ours --quantize q8_0 -p 128 -n 64 -r 5
done
echo "== depth (bf16)"
llama bf16 -p 0 -n 64 -d 0,2048 -r 3
ours -p 0 -n 64 -d 0,2048 -r 3
echo "== weight pages: huge, then 4 KiB (bf16)"
ours -p 0 -n 64 -r 5 --placement huge
ours -p 0 -n 64 -r 5 --placement normal
echo "== another process busy on one core (bf16)"
(while :; do :; done) &
busy=$!
trap 'kill $busy 2>/dev/null' EXIT
llama bf16 -p 128 -n 64 -r 3
ours -p 128 -n 64 -r 3
