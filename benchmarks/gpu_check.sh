#!/usr/bin/env bash
# Every GPU check of the LIF kernel, in one command, with a summary table:
#
#     bash benchmarks/gpu_check.sh
#
# Writes summary.txt, versions.txt and one log per part to $GPU_CHECK_DIR, else $OUT/gpu_check
# when $OUT is set, else gpu_check_results/ (the path is printed). Each part has its own timeout,
# and all of them together stay inside a budget ($GPU_CHECK_BUDGET seconds, default 450), so one
# hang cannot eat the machine's time: a part that would start past the budget is skipped.
# Exit status: 0 when nothing failed (parts may be skipped), 1 otherwise.
#
# Without a CUDA device (or torch without CUDA) it reports "no CUDA device", writes the versions
# and exits 0 within seconds. Without spikingjelly the comparisons against it and the
# spikingjelly baseline of the train-step benchmark are skipped, and the summary says so; a
# wheel carried in .whl/ (pip download --no-deps -d .whl spikingjelly==0.0.0.0.14) is used.
set -u

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
RESULTS=${GPU_CHECK_DIR:-}
if [ -z "$RESULTS" ]; then
    if [ -n "${OUT:-}" ]; then RESULTS=$OUT/gpu_check; else RESULTS=$REPO/gpu_check_results; fi
fi
mkdir -p "$RESULTS" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$(date +%s)
SUMMARY=$RESULTS/summary.txt
ROWS=()
FAILED=0
N=0

row() {  # name status seconds note
    ROWS+=("$(printf '%-40s %-8s %6s  %s' "$1" "$2" "$3" "$4")")
}

note_of() {  # the last meaningful line of a log, shortened
    grep -v '^\s*$' "$1" 2>/dev/null | grep -v 'Warning\|warn(' | tail -n 1 | cut -c1-90
}

part() {  # part NAME TIMEOUT COMMAND...: run COMMAND with a timeout, log it, add a row
    local name=$1 limit=$2
    shift 2
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

# spikingjelly (the oracle of some tests and the train-step baseline) from a carried wheel, when
# it is not installed: into a private folder, the machine's environment is left as it is.
if ! "$PY" -c "import spikingjelly" 2>/dev/null; then
    wheel=$(ls "$REPO"/.whl/spikingjelly-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheel" ] && "$PY" -m pip install -q --no-deps --target "$RESULTS/site" "$wheel" \
        >"$RESULTS/spikingjelly_install.log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$RESULTS/site"
    fi
fi

# --------------------------------------------------------------------------- versions, verdict

versions() {
    "$PY" - <<'EOF'
import importlib.util, shutil, subprocess
import torch
from qkformer import cuda as lif_cuda
from qkformer.neuron import describe_backend

for key, value in lif_cuda.versions().items():
    print(f"{key}: {value}")
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
    print("spikingjelly: not installed; comparisons against it and the train-step baseline are "
          "skipped (to run them, carry its wheel in .whl/: pip download --no-deps -d .whl "
          "spikingjelly==0.0.0.0.14)")
else:
    import spikingjelly
    print(f"spikingjelly: installed ({spikingjelly.__file__})")
EOF
}

echo "qkformer GPU check; results in $RESULTS"
versions >"$RESULTS/versions.txt" 2>&1
VRC=$?
cat "$RESULTS/versions.txt"
if [ $VRC -ne 0 ]; then
    row "versions and backend verdict" FAIL 0 "$(note_of "$RESULTS/versions.txt")"
    FAILED=1
    finish
fi
row "versions and backend verdict" PASS 0 "$(grep '^kernel verdict' "$RESULTS/versions.txt" | cut -c1-90)"

GPU_PARTS=("kernel self-check, kernel really ran" "sizes, views, T=1, empty" "+inf/-inf/NaN inputs"
           "side-stream race (fwd and bwd)" "fp16, T*N > 2^31" "kernel vs torch (fp32/fp16/bf16)"
           "AMP fp16 training, kernel vs torch" "torch.compile fullgraph on CUDA"
           "dispatch/self-check stand-ins (CPU)" "per-call latency" "benchmarks/lif_gpu.py"
           "benchmarks/train_step.py --device cuda" "torchrun 1 GPU, cifar10/train.py"
           "fast path on CUDA (fp64 vs reference, AMP, checkpointing)"
           "benchmarks/memory.py --device cuda")
if ! grep -q '^CUDA device: yes' "$RESULTS/versions.txt"; then
    echo "no CUDA device: GPU checks skipped"
    for name in "${GPU_PARTS[@]}"; do row "$name" SKIP 0 "no CUDA device"; done
    finish
fi

# ------------------------------------------------------------------------------------- parts

HAVE_SJ=0
"$PY" -c "import spikingjelly" 2>/dev/null && HAVE_SJ=1
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
tests() {  # tests NAME TIMEOUT PYTEST-ARGS...
    part "$1" "$2" bash -c 'pytest_part "$@"' pytest_part "${@:3}"
}
KT=tests/test_cuda_kernel.py

tests "${GPU_PARTS[0]}" 120 "$KT" -k "selfcheck_passes or really_runs or backend_required"
tests "${GPU_PARTS[1]}" 150 "$KT" -k "sizes_and_layouts or gpu_contract"
tests "${GPU_PARTS[2]}" 120 "$KT" -k "special_values"
tests "${GPU_PARTS[3]}" 90 "$KT" -k "side_stream_race"
tests "${GPU_PARTS[4]}" 150 "$KT" -k "beyond_int32"
tests "${GPU_PARTS[5]}" 150 "$KT" -k "fp32_matches or 16bit_close or second_device"
tests "${GPU_PARTS[6]}" 150 -s "$KT" -k "amp_training"
tests "${GPU_PARTS[7]}" 180 "$KT" -k "torch_compile_fullgraph_uses"
QKFORMER_REQUIRE_CUDA_KERNEL= tests "${GPU_PARTS[8]}" 90 tests/test_lif_dispatch.py -m "not slow"
part "${GPU_PARTS[9]}" 90 "$PY" benchmarks/lif_latency.py --device cuda --iters 200
part "${GPU_PARTS[10]}" 120 "$PY" benchmarks/lif_gpu.py --iters 20
if [ $HAVE_SJ -eq 1 ]; then
    part "${GPU_PARTS[11]}" 240 "$PY" benchmarks/train_step.py --device cuda --configs baseline fp32 amp
else
    part "${GPU_PARTS[11]} (no baseline: no spikingjelly)" 240 \
        "$PY" benchmarks/train_step.py --device cuda --configs fp32 amp
fi

tests "${GPU_PARTS[13]}" 150 tests/test_fast_path.py -k "gpu_"
part "${GPU_PARTS[14]}" 150 "$PY" benchmarks/memory.py --device cuda --models cifar hst384 \
    --step-models cifar

torchrun_check() {
    local work
    work=$(mktemp -d)
    "$PY" -c "from qkformer.data.synthetic_images import write_png_image_folder as w; \
w('$work/data', classes=4, per_class_train=16, per_class_val=4, size=(32, 32))" || return 1
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 cifar10/train.py \
        --data-dir "$work/data" --output-dir "$work/run" --epochs 1 --warmup-epochs 0 \
        --cooldown-epochs 0 --max-iters 4 --batch-size 8 --workers 2 --no-progress \
        >"$work/train.log" 2>&1
    local rc=$?
    cat "$work/train.log"
    [ $rc -eq 0 ] || return $rc
    grep -q "^LIF backend: cupy" "$work/train.log" || { echo "the kernel was not used"; return 1; }
    grep -q "^precision: fp16 autocast" "$work/train.log" || { echo "no fp16 AMP"; return 1; }
    echo "torchrun run: $(grep '^epoch 0' "$work/train.log")"
}
export -f torchrun_check
part "${GPU_PARTS[12]}" 180 bash -c torchrun_check

finish
