#!/usr/bin/env bash
# The GPU checks that fit a 10-minute window, most important first, with a summary table:
#
#     bash benchmarks/gpu_check.sh
#
#   1. versions; the CuPy LIF kernel's and the Triton units' self-checks; the default path on CUDA
#   2. fast path vs reference path on CUDA with the kernels running (fp64/fp32 and fp16 AMP tests)
#   3. HST-10-384, batch 32, 224 px, fp16 AMP: the default vs the original's computation (time by
#      CUDA events, profiler top 10)
#   4. peak memory at batch 32 and 64, the default vs the original's computation
#   5. two DDP ranks on the one GPU (gloo)
#   6. the fast path under torch.compile on CUDA
#
# Writes summary.txt, versions.txt and one log per part to $GPU_CHECK_DIR, else $OUT/gpu_check
# when $OUT is set, else gpu_check_results/ (the path is printed). Each part has its own timeout;
# together they stay inside a budget ($GPU_CHECK_BUDGET seconds, default 420), so one hang cannot
# eat the window: a part that would start past the budget is skipped, and the table says so.
# Exit status: 0 when nothing failed (parts may be skipped), 1 otherwise.
# GPU_CHECK_DRY_RUN=1 prints each part's name and timeout (tab-separated) and the budget, runs
# nothing and exits 0.
#
# Without a CUDA device (or torch without CUDA) it reports "no CUDA device", writes the versions
# and exits 0 within seconds. spikingjelly (the oracle of some tests) comes from a wheel carried
# in .whl/ when it is not installed (pip download --no-deps -d .whl spikingjelly==0.0.0.0.14).
set -u

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET:-420}
START=$(date +%s)
RESULTS=${GPU_CHECK_DIR:-}
if [ -z "$RESULTS" ]; then
    if [ -n "${OUT:-}" ]; then RESULTS=$OUT/gpu_check; else RESULTS=$REPO/gpu_check_results; fi
fi
[ "$DRY" = 1 ] || mkdir -p "$RESULTS" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY=$RESULTS/summary.txt
ROWS=()
FAILED=0
N=0

# The parts, most important first. Their timeouts are given where each part runs below; with the
# versions' 20 s they sum to at most 420 s (tests/test_gpu_check.py holds them to it).
VERSIONS="versions and backend verdict"
GPU_PARTS=("self-checks: CuPy LIF, Triton, path"
           "fast vs reference path, kernels (tests)"
           "HST-10-384 b32 AMP: default vs original"
           "peak memory b32+64: default vs original"
           "DDP: 2 ranks, gloo, one GPU"
           "torch.compile fast path on CUDA")

row() {  # name status seconds note
    ROWS+=("$(printf '%-40s %-8s %6s  %s' "$1" "$2" "$3" "$4")")
}

note_of() {  # the last meaningful line of a log, shortened
    grep -v '^\s*$' "$1" 2>/dev/null | grep -v 'Warning\|warn(' | tail -n 1 | cut -c1-90
}

part() {  # part NAME TIMEOUT COMMAND...: run COMMAND with a timeout, log it, add a row
    local name=$1 limit=$2
    shift 2
    if [ "$DRY" = 1 ]; then
        printf 'part\t%s\t%s\n' "$name" "$limit"
        return
    fi
    N=$((N + 1))
    local log
    log=$RESULTS/$(printf '%02d' "$N")_$(echo "$name" | tr -c 'A-Za-z0-9\n' '_' | cut -c1-40).log
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        row "$name" SKIP 0 "budget of ${BUDGET}s spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        row "$name" PASS "$dt" "$(note_of "$log")"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        row "$name" TIMEOUT "$dt" "killed after ${limit}s; see $(basename "$log")"
        FAILED=1
    else
        row "$name" FAIL "$dt" "rc $rc: $(note_of "$log")"
        FAILED=1
    fi
    echo "   -> ${ROWS[-1]}"
}

finish() {
    if [ "$DRY" = 1 ]; then
        printf 'budget\t%s\n' "$BUDGET"
        exit 0
    fi
    {
        echo "qkformer GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(($(date +%s) - START)) s"
        echo
        cat "$RESULTS/versions.txt" 2>/dev/null
        echo
        printf '%-40s %-8s %6s  %s\n' part status seconds note
        printf '%s\n' "${ROWS[@]}"
    } >"$SUMMARY"
    echo
    cat "$SUMMARY"
    echo
    echo "results: $RESULTS (summary: $SUMMARY)"
    exit $FAILED
}

# spikingjelly (the oracle of some tests) from a carried wheel, when it is not installed: into a
# private folder, the machine's environment is left as it is.
if [ "$DRY" != 1 ] && ! "$PY" -c "import spikingjelly" 2>/dev/null; then
    wheel=$(ls "$REPO"/.whl/spikingjelly-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheel" ] && timeout 60 "$PY" -m pip install -q --no-deps --target "$RESULTS/site" \
        "$wheel" >"$RESULTS/spikingjelly_install.log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$RESULTS/site"
    fi
fi

# --------------------------------------------------------------------------- versions, verdict

versions() {
    "$PY" - <<'EOF'
import importlib.metadata, importlib.util, shutil, subprocess
import torch
from qkformer import cuda as lif_cuda
from qkformer.neuron import describe_backend

for key, value in lif_cuda.versions().items():
    print(f"{key}: {value}")
try:
    print(f"triton: {importlib.metadata.version('triton')}")
except importlib.metadata.PackageNotFoundError:
    print("triton: not installed")
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    print(f"nvidia-smi: {q.stdout.strip() or q.stderr.strip()}")
print(f"nvcc: {shutil.which('nvcc') or 'not on PATH (host-compiled kernel tests skipped)'}")
cuda = torch.cuda.is_available()
print(f"CUDA device: {'yes' if cuda else 'no CUDA device'}")
print(f"kernel verdict: {'available' if lif_cuda.is_available() else lif_cuda.unavailable_reason()}")
print(describe_backend("cuda" if cuda else "cpu"))
if importlib.util.find_spec("spikingjelly") is None:
    print("spikingjelly: not installed; the tests that compare against it are skipped (to run "
          "them, carry its wheel in .whl/: pip download --no-deps -d .whl "
          "spikingjelly==0.0.0.0.14)")
else:
    import spikingjelly
    print(f"spikingjelly: installed ({spikingjelly.__file__})")
EOF
}

VERSIONS_LIMIT=20
if [ "$DRY" = 1 ]; then
    printf 'part\t%s\t%s\n' "$VERSIONS" "$VERSIONS_LIMIT"
else
    echo "qkformer GPU check; results in $RESULTS"
    export -f versions
    export PY
    timeout --kill-after=5 "$VERSIONS_LIMIT" bash -c versions >"$RESULTS/versions.txt" 2>&1
    VRC=$?
    cat "$RESULTS/versions.txt"
    if [ $VRC -ne 0 ]; then
        row "$VERSIONS" FAIL 0 "rc $VRC: $(note_of "$RESULTS/versions.txt")"
        FAILED=1
        finish
    fi
    row "$VERSIONS" PASS 0 "$(grep '^kernel verdict' "$RESULTS/versions.txt" | cut -c1-90)"
    if ! grep -q '^CUDA device: yes' "$RESULTS/versions.txt"; then
        echo "no CUDA device: GPU checks skipped"
        for name in "${GPU_PARTS[@]}"; do row "$name" SKIP 0 "no CUDA device"; done
        finish
    fi
fi

# ------------------------------------------------------------------------------------- parts

export PY
export QKFORMER_REQUIRE_CUDA_KERNEL=1  # a fallback to the torch backend is a failure here

pytest_part() {  # pytest, failing also when every selected test was skipped
    local tmp rc
    tmp=$(mktemp)
    "$PY" -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$tmp"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || return "$rc"
    grep -v '^\s*$' "$tmp" | tail -n 1 | grep -q ' passed' || { echo "nothing passed (all skipped)"; return 1; }
}
export -f pytest_part

# 1. The verdicts everything later depends on.
part "${GPU_PARTS[0]}" 70 "$PY" benchmarks/gpu_selfcheck.py

# 2. The Triton units natively, and the fast path against the reference path with the kernels
# running (QKFORMER_CUDA_FAST_PATH=1: the fast path even where the default would not take it).
# The compile tests are left to full test runs (part 6 compiles the fast path), and so are the
# tests of the opt-in GEMMs (benchmarks/gpu_gemm_fusion.py checks them against cuBLAS).
FAST_TESTS=()
for f in tests/test_triton_units.py tests/test_fast_path.py tests/test_cuda_kernel.py; do
    [ -f "$f" ] && FAST_TESTS+=("$f")
done
part "${GPU_PARTS[1]}" 115 env QKFORMER_CUDA_FAST_PATH=1 bash -c 'pytest_part "$@"' pytest_part \
    -x "${FAST_TESTS[@]}" -k "(gpu_ or test_triton_units) and not torch_compile_fullgraph \
    and not (compiled or traced or gemm or weight_gradient)"

# 3, 4. The question the GPU path has to answer: faster and smaller than the original's computation?
part "${GPU_PARTS[2]}" 75 "$PY" benchmarks/gpu_step.py time --model hst384 --batch 32 \
    --warmup 3 --steps 10
part "${GPU_PARTS[3]}" 50 "$PY" benchmarks/gpu_step.py memory --model hst384 --batches 32 64

# 5, 6.
part "${GPU_PARTS[4]}" 35 "$PY" benchmarks/gpu_ddp.py --ranks 2 --steps 3
part "${GPU_PARTS[5]}" 55 "$PY" benchmarks/gpu_compile.py

finish
