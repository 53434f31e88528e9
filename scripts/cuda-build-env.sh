#!/usr/bin/env bash
# Assembles a CUDA 13.0 *build* toolchain (nvcc, headers, link libraries) from NVIDIA's PyPI
# wheels, so that `cargo build --features cuda` compiles on a machine without a GPU or a system
# CUDA (CI). Prints `export` lines on stdout (use with eval); progress goes to stderr.
#
#   eval "$(scripts/cuda-build-env.sh ~/.cache/zagreus-cuda)"
#   cargo build --release --features cuda
#
# CUDA 13.0 exactly: the GPU machines we run on have a CUDA 13.0 driver, candle loads its kernels
# as PTX, and PTX from a newer nvcc fails on an older driver; cudarc also refuses CUDA versions it
# does not know. The CUDA 12 wheels lack the nvcc driver program, so 13.x it is.
# No wheel ships libcuda (it comes with the driver): a link-time stub with the same SONAME is
# built, whose functions all return CUDA_ERROR_STUB_LIBRARY. With the stub first on
# LD_LIBRARY_PATH a cuda build starts on a CPU-only machine and reports that no GPU is usable.
#
# Env: PYTHON (default python3, with pip), CUDA_COMPUTE_CAP (default 90: sm_90a, H100/H200).
# Idempotent: a second run on the same prefix reuses what is installed.
set -euo pipefail

prefix=${1:?usage: $0 PREFIX}
py=${PYTHON:-python3}
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
site=$prefix/site
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)
marker=$site/.zagreus-cuda-13.0.88
if [ ! -e "$marker" ]; then
  echo "cuda-build-env: installing ${#wheels[@]} wheels (about 700 MB) into $site" >&2
  # --no-deps: the wheels' own requirements are unpinned and would pull a newer CUDA series.
  "$py" -m pip install -q --disable-pip-version-check --no-deps --no-compile --only-binary=:all: \
    --target "$site" "${wheels[@]}" >&2
  touch "$marker"
fi

root=$site/nvidia/cu13
lib=$root/lib
inc=$root/include
# The linker wants unversioned names (-lcudart -lcublas -lcublasLt -lcurand -lnvrtc).
for name in cudart:13 cublas:13 cublasLt:13 curand:10 nvrtc:13; do
  base=${name%%:*}
  ver=${name##*:}
  if [ ! -e "$lib/lib$base.so.$ver" ]; then
    echo "cuda-build-env: $lib/lib$base.so.$ver is missing" >&2
    exit 1
  fi
  ln -sfn "lib$base.so.$ver" "$lib/lib$base.so"
done
ln -sfn lib "$root/lib64"

stub_dir=$lib/stubs
if [ ! -e "$stub_dir/libcuda.so.1" ]; then
  mkdir -p "$stub_dir"
  # Every cu* entry point cuda.h declares (with and without the versioned aliases), returning 34.
  {
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$inc/cuda.h" | tr -d ' (\t'
    grep -hE '^[[:space:]]*#[[:space:]]*define[[:space:]]+cu[A-Z][A-Za-z0-9_]*[[:space:]]+cu[A-Z][A-Za-z0-9_]*' "$inc/cuda.h" |
      sed -E 's/^[[:space:]]*#[[:space:]]*define[[:space:]]+//' | awk '{print $1; print $2}'
    for flag in "" -D__CUDA_API_VERSION_INTERNAL; do
      gcc -E -P $flag -I"$inc" "$inc/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (\t'
    done
    printf '%s\n' cuProfilerInitialize cuProfilerStart cuProfilerStop
  } | sort -u | awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$stub_dir/libcuda_stub.c"
  gcc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/libcuda_stub.c"
  ln -sfn libcuda.so "$stub_dir/libcuda.so.1"
  echo "cuda-build-env: stub libcuda with $(wc -l <"$stub_dir/libcuda_stub.c") entry points" >&2
fi

"$root/bin/nvcc" --version | tail -1 >&2
cat <<EOF
export CUDA_HOME='$root'
export CUDA_PATH='$root'
export CUDA_ROOT='$root'
export NVCC='$root/bin/nvcc'
export PATH='$root/bin':"\$PATH"
export LIBRARY_PATH='$lib:$stub_dir'"\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export ZAGREUS_CUDA_STUB_PATH='$stub_dir:$lib'
export CUDA_COMPUTE_CAP='${CUDA_COMPUTE_CAP:-90}'
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-\$(nproc)}"
EOF
