#!/usr/bin/env bash
# GPU check, one command, under 8 min: builds longformer_ext for this GPU's arch only against the installed torch
# (nothing is downloaded), runs a reduced tests/test_cuda.py + SASS checks, times fwd and fwd+bwd at N 16K/64K,
# bf16/fp32, G 0/64 against compiled flex_attention and SDPA (band mask, N <= 16K), prints one markdown table.
#   bash scripts/gpu_check.sh    logs, cuda.json, table.md -> $OUT if set, else bench/out/
#   env: PYTHON, GPU_CHECK_BUILD=auto|pip|cmake, GPU_CHECK_TESTS=0, GPU_CHECK_BENCH_ARGS, GPU_CHECK_BUILD_ONLY=1
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
T0=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-465}   # whole script; 8 minutes = 480 s
LOGDIR=${OUT:-$ROOT/bench/out}
mkdir -p "$LOGDIR"
LOGDIR=$(cd "$LOGDIR" && pwd)
exec > >(tee "$LOGDIR/gpu_check.log") 2>&1
TEE_PID=$!
# Let tee write out the last lines before the script's exit is reported.
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2> /dev/null' EXIT
export PYTHONUNBUFFERED=1
JOBS=$(nproc 2>/dev/null || echo 4)

STEPS=()    # "name|status|seconds" per step, for the summary
FAILED=0
elapsed() { echo $((SECONDS - T0)); }
left() { echo $((BUDGET - (SECONDS - T0))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
die() {
  echo "gpu_check: $*" >&2
  exit 2
}

# run_step NAME TIMEOUT_S LOG CMD...: runs CMD under `timeout` (its output also into LOG unless LOG is -),
# prints and records its status and time.
run_step() {
  local name=$1 limit=$2 log=$3 start rc status
  shift 3
  start=$SECONDS
  echo
  echo "=== $name (limit ${limit} s; $(elapsed) s of ${BUDGET} s used)"
  if [ "$log" = - ]; then
    timeout -k 10 "$limit" "$@"
    rc=$?
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED-OUT(${limit}s)" ;;
    *) status="FAILED(rc=$rc)" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED=1
  STEPS+=("$name|$status|$((SECONDS - start))")
  echo "--- $name: $status in $((SECONDS - start)) s"
  return "$rc"
}

skip_step() {
  STEPS+=("$1|skipped: $2|0")
  echo "--- $1: skipped ($2)"
}

summary() {
  echo
  echo "=== summary ($(elapsed) s in all; logs in $LOGDIR)"
  local s name status secs
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name status secs <<< "$s"
    printf '  %-9s %5s s  %s\n' "$name" "$secs" "$status"
  done
}

# ---------------------------------------------------------------- 0. preflight: GPU, python, torch, toolchain
echo "=== preflight"
PY=""
for cand in ${PYTHON:-} python3 python /opt/torch/.venv/bin/python3; do
  if command -v "$cand" > /dev/null 2>&1 && "$cand" -c "import torch" > /dev/null 2>&1; then
    PY=$(command -v "$cand")
    break
  fi
done
[ -n "$PY" ] || die "no python with torch found (tried \$PYTHON, python3, python, /opt/torch/.venv/bin/python3)"
PY=$("$PY" -c "import sys; print(sys.executable)")
# The venv's own cmake, ninja and pytest come first.
PATH="$(dirname "$PY"):$PATH"

GPU_NAME="" CAP=""
if command -v nvidia-smi > /dev/null 2>&1; then
  line=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2> /dev/null | head -n 1)
  GPU_NAME=$(echo "$line" | cut -d, -f1 | sed 's/^ *//;s/ *$//')
  CAP=$(echo "$line" | cut -d, -f2 | tr -d ' ')
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv 2> /dev/null
fi
read -r TORCH_VERSION TORCH_CUDA TORCH_GPU TORCH_CAP < <("$PY" -c "
import torch
ok = torch.cuda.is_available()
cap = '%d.%d' % torch.cuda.get_device_capability() if ok else '-'
print(torch.__version__, torch.version.cuda or '-', int(ok), cap)")
echo "python: $PY"
echo "torch:  $TORCH_VERSION (CUDA ${TORCH_CUDA})"
BUILD_ONLY=${GPU_CHECK_BUILD_ONLY:-0}   # self-test of this script on a machine without a GPU: build only
if [ "$BUILD_ONLY" != 1 ]; then
  no_smi=$(command -v nvidia-smi > /dev/null || echo "; no nvidia-smi")
  [ "$TORCH_GPU" = 1 ] || die "no CUDA GPU visible (torch.cuda.is_available() is False$no_smi)"
  [ "$TORCH_CUDA" != - ] || die "torch $TORCH_VERSION is a CPU build; the GPU check needs a CUDA build of torch"
  [ -n "$CAP" ] || CAP=$TORCH_CAP
  [ -n "$GPU_NAME" ] || GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
fi
ARCH=${LONGFORMER_CUDA_ARCHS:-$CAP}
[ -n "$ARCH" ] || die "no GPU arch: set LONGFORMER_CUDA_ARCHS (e.g. 9.0)"
echo "GPU:    ${GPU_NAME:-none} (compute capability ${CAP:-?}); building for arch $ARCH only"

NVCC=${CUDACXX:-}
if [ -z "$NVCC" ]; then
  # pip's CUDA packages (nvidia-cuda-nvcc) put nvcc under site-packages/nvidia/.
  NVIDIA_DIR=$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2> /dev/null || echo /nonexistent)
  for cand in "$(command -v nvcc)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc \
    /usr/local/cuda-*/bin/nvcc \
    "$NVIDIA_DIR/cu13/bin/nvcc" "$NVIDIA_DIR/cuda_nvcc/bin/nvcc"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then
      NVCC=$cand
      break
    fi
  done
fi
[ -n "$NVCC" ] || die "no nvcc found (PATH, \$CUDA_HOME, /usr/local/cuda*); set CUDACXX"
NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
echo "nvcc:   $NVCC ($NVCC_VERSION)"
if [ "${NVCC_VERSION%%.*}" != "${TORCH_CUDA%%.*}" ]; then
  echo "warning: nvcc $NVCC_VERSION and torch's CUDA $TORCH_CUDA differ in their major version"
fi
# cuobjdump (tests/test_cuda_build.py) sits beside the toolkit's nvcc (/usr/local/bin/nvcc may be a wrapper).
PATH="$(dirname "$NVCC"):$PATH"
[ -d /usr/local/cuda/bin ] && PATH="$PATH:/usr/local/cuda/bin"
export CUDACXX=$NVCC
# /usr/local/bin/nvcc may be a wrapper: name the toolkit only where it lies beside this nvcc.
toolkit=$(dirname "$(dirname "$NVCC")")
[ -z "${CUDA_PATH:-}" ] && [ -f "$toolkit/include/cuda_runtime.h" ] && export CUDA_PATH=$toolkit

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }
CMAKE=""
for cand in "$(command -v cmake)" "$("$PY" -c 'import cmake; print(cmake.CMAKE_BIN_DIR)' 2> /dev/null)/cmake"; do
  if [ -x "$cand" ] && version_ge "$("$cand" --version | sed -n '1s/[^0-9]*\([0-9.]*\).*/\1/p')" 3.26; then
    CMAKE=$cand
    break
  fi
done
[ -n "$CMAKE" ] || die "no cmake >= 3.26 found (PATH or the cmake Python package)"
NINJA=$(command -v ninja || true)
[ -n "$NINJA" ] || NINJA=$("$PY" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2> /dev/null ||
  true)
HAVE_SKBUILD=$("$PY" -c 'import scikit_build_core; print(1)' 2> /dev/null || echo 0)
PATH="$(dirname "$CMAKE"):$PATH"
[ -n "$NINJA" ] && PATH="$(dirname "$NINJA"):$PATH"
echo "cmake:  $CMAKE ($("$CMAKE" --version | head -n 1)); ninja: ${NINJA:-none}"
echo "scikit-build-core: $HAVE_SKBUILD; $JOBS cores"
STEPS+=("preflight|ok|$(elapsed)")

# ---------------------------------------------------------------- 1. build for this arch only, into $SITE
BUILD="$ROOT/build/gpu-$TORCH_VERSION-sm${ARCH//[.;]/}"
SITE="$BUILD/site"            # holds longformer_ext as an install would lay it out (library + _build_info.py)
MODE=${GPU_CHECK_BUILD:-auto}
if [ "$MODE" = auto ]; then
  if [ "$HAVE_SKBUILD" = 1 ] && [ -n "$NINJA" ]; then MODE=pip; else MODE=cmake; fi
fi
CUDA_OPT=ON
[ "$BUILD_ONLY" = 1 ] && CUDA_OPT=${LONGFORMER_CUDA:-ON}   # the self-test may build a CPU torch with OFF
# Read by pyproject.toml's [tool.scikit-build.cmake.define] (pip) and passed as -D (cmake).
export LONGFORMER_CUDA=$CUDA_OPT LONGFORMER_CUDA_ARCHS=$ARCH LONGFORMER_CUDA_EMULATION=OFF
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
export PY SITE BUILD LOGDIR MODE CMAKE NINJA NVCC ARCH ROOT JOBS

# shellcheck disable=SC2329  # run through `bash -c build` under timeout
build_pip() {
  # --no-build-isolation: against the torch installed here; --no-deps/--no-index: nothing is fetched.
  "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir -v --target "$SITE" \
    -C "build-dir=$BUILD/skbuild" "$ROOT"
}

# shellcheck disable=SC2329
build_cmake() {
  "$CMAKE" -S "$ROOT" -B "$BUILD/cmake" ${NINJA:+-G Ninja} -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$PY" -DCMAKE_CUDA_COMPILER="$NVCC" -DLONGFORMER_CUDA="$LONGFORMER_CUDA" \
    -DLONGFORMER_CUDA_ARCHS="$ARCH" -DLONGFORMER_CUDA_EMULATION=OFF &&
    "$CMAKE" --build "$BUILD/cmake" -j "$JOBS" &&
    mkdir -p "$SITE/longformer_ext" &&
    cp -r "$ROOT/python/longformer_ext/." "$SITE/longformer_ext/" &&
    "$CMAKE" --install "$BUILD/cmake" --prefix "$SITE"
}

# shellcheck disable=SC2329
build() {
  rm -rf "$SITE"
  echo "build: $MODE into $BUILD (log: $LOGDIR/build.log)"
  local ok=1
  "build_$MODE" > "$LOGDIR/build.log" 2>&1 || ok=0
  if [ "$ok" = 0 ] && [ "$MODE" = pip ] && ! grep -q -E "^ *FAILED: " "$LOGDIR/build.log"; then
    # pip or scikit-build-core failed before compiling anything: configure and build with cmake itself.
    echo "build: pip failed outside the compiler (end of its log below); trying cmake directly"
    tail -n 15 "$LOGDIR/build.log"
    mv "$LOGDIR/build.log" "$LOGDIR/build_pip.log"
    rm -rf "$SITE"
    ok=1
    build_cmake > "$LOGDIR/build.log" 2>&1 || ok=0
  fi
  if [ "$ok" = 0 ]; then
    echo "build failed; the errors and the end of $LOGDIR/build.log:"
    grep -n -E "error|FAILED" "$LOGDIR/build.log" | head -n 20
    tail -n 40 "$LOGDIR/build.log"
    return 1
  fi
  ls -la "$SITE/longformer_ext/_longformer_ops.so"
  cat "$SITE/longformer_ext/_build_info.py"
}

export -f build build_pip build_cmake
if ! run_step build "$(min "${GPU_CHECK_BUILD_S:-300}" $(($(left) - 150)))" - bash -c build; then
  summary
  exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- 2. smoke: the package loads and one op runs
if [ "$BUILD_ONLY" = 1 ]; then
  run_step import 60 - "$PY" -c "
import longformer_ext, torch
from longformer_ext import _build_info
print('loaded', longformer_ext.__file__, longformer_ext.build_info())
q = torch.randn(1, 2, 300, 64)
print('CPU op ok', tuple(longformer_ext.longformer_attention(q, q, q, 32).shape))"
  summary
  exit $FAILED
fi
run_step smoke 60 - "$PY" -c "
import torch, longformer_ext
from longformer_ext import _build_info, longformer_attention
assert _build_info.CUDA_MAJOR is not None, 'this build has no CUDA kernels'
print('loaded', longformer_ext.__file__, longformer_ext.build_info())
q = torch.randn(1, 12, 4096, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
out = longformer_attention(q, q, q, 256)
out.sum().backward()
torch.cuda.synchronize()
assert torch.isfinite(out).all() and torch.isfinite(q.grad).all(), 'non-finite output or gradient'
print('bf16 fwd+bwd at N=4096: ran, finite')"

# ---------------------------------------------------------------- 3. reduced tests/test_cuda.py + SASS checks
# At most 150 s, and at least 170 s are kept for the benchmark.
limit=$(min 150 $(($(left) - 170)))
if [ "${GPU_CHECK_TESTS:-1}" = 0 ]; then
  skip_step tests "GPU_CHECK_TESTS=0"
elif [ "$limit" -lt 60 ]; then
  skip_step tests "only $(left) s left, kept for the benchmark"
else
  timeout_opt=()
  "$PY" -c "import pytest_timeout" 2> /dev/null && timeout_opt=(--timeout 90)
  # 30 of the 60 random small cases, the four N = 4099 cases, CPU parity, gradcheck, opcheck, compile,
  # determinism; the general op's 40 random cases (q_offset, cu_seqlens, softcap, ALiBi, sinks, GQA)
  # against the oracle; test_cuda_build.py reads the SASS of the library just built (sm_$ARCH only).
  export LONGFORMER_REQUIRE_CUDA=1 LONGFORMER_REQUIRE_CUDA_BUILD=1
  if ! command -v cuobjdump > /dev/null; then
    echo "no cuobjdump on PATH: tests/test_cuda_build.py (SASS checks) will skip"
    LONGFORMER_REQUIRE_CUDA_BUILD=0
  fi
  export LONGFORMER_CUDA_SWEEP_COUNT=${LONGFORMER_CUDA_SWEEP_COUNT:-30}
  run_step tests "$limit" "$LOGDIR/test_cuda.log" "$PY" -m pytest -q -p no:cacheprovider \
    -rfEs "${timeout_opt[@]}" tests/test_cuda.py tests/test_cuda_build.py \
    tests/test_general_op.py::test_cuda_general_op_matches_oracle
fi

# ---------------------------------------------------------------- 4. benchmark, then one table
JSON="$LOGDIR/cuda.json"
rm -f "$JSON"
limit=$(($(left) - 15))
if [ "$limit" -lt 60 ]; then
  skip_step bench "only $(left) s left"
else
  # shellcheck disable=SC2086
  run_step bench "$limit" "$LOGDIR/bench.log" "$PY" bench/bench_cuda.py --quick --budget-s $((limit - 75)) \
    --out "$JSON" ${GPU_CHECK_BENCH_ARGS:-}
fi

summary
if [ -s "$JSON" ]; then
  echo
  "$PY" bench/bench_cuda.py --table "$JSON" | tee "$LOGDIR/table.md"
fi
exit $FAILED
