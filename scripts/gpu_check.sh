#!/usr/bin/env bash
# One prepared check of the GPU path, for a fresh CUDA machine with PyTorch, Triton, timm,
# torchvision, scipy, PyYAML, matplotlib and tqdm installed and no network:
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu-check-out/
#   bash scripts/gpu_check.sh --dry-run [OUT]    # print the steps' commands, run nothing
#
# Installs dassdp (editable, no deps; falls back to PYTHONPATH=src), wheels from .whl/ if that
# folder exists (e.g. pytest), prints versions and nvidia-smi, runs `pytest -m cuda` and the
# CUDA benchmarks, which write the `(cuda)` sections of docs/benchmarks.md and
# docs/bench/*cuda*.csv. Every step runs under `timeout` within a global deadline (the whole
# script stays under 8 minutes; a step that would not fit is skipped and said so); a failing
# step does not stop the others; the exit status is non-zero if any step failed.
# OUT_DIR gets at most five files: gpu_check.log, benchmarks.md (a copy of the updated
# docs/benchmarks.md), pytest-cuda.xml (JUnit), bench-cuda-csv.tar.gz, steps.tsv.
set -u

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=1
    shift
fi
OUT="${1:-gpu-check-out}"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-450}"   # global budget, seconds (< 8 minutes)
START=$(date +%s)
DEADLINE=$((START + TOTAL_S))
FAILED=0
STEPS=()

cd "$(dirname "$0")/.."
if [[ $DRY -eq 0 ]]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_check.log"
    : > "$LOG"
    exec > >(tee -a "$LOG") 2>&1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONUNBUFFERED=1

# step NAME BUDGET_S CMD...: run CMD under timeout (its budget, cut to the time left), print
# its exit status and elapsed time, record it; never stops the script.
step() {
    local name=$1 budget=$2
    shift 2
    if [[ $DRY -eq 1 ]]; then
        echo "STEP $name (budget ${budget}s): $(printf '%q ' "$@")"
        return 0
    fi
    local now left limit t0 rc el
    now=$(date +%s)
    left=$((DEADLINE - now))
    echo
    echo "=== [$((now - START))s] $name: $*"
    if ((left < 20)); then
        echo "=== $name: SKIPPED, ${left}s left of the ${TOTAL_S}s budget"
        STEPS+=("$name	skipped (time)	0")
        return 0
    fi
    limit=$((budget < left ? budget : left))
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    el=$(($(date +%s) - t0))
    if ((rc == 124 || rc == 137)); then
        echo "=== $name: TIMED OUT after ${el}s (limit ${limit}s)"
    fi
    echo "=== $name: exit $rc, ${el}s (limit ${limit}s)"
    STEPS+=("$name	exit $rc	$el")
    if ((rc != 0)); then FAILED=1; fi
    return 0
}

BENCH=("$PY" -m dassdp bench)  # an array: `timeout` runs commands, not shell functions

# ---------------------------------------------------------------- set-up
if [[ $DRY -eq 0 ]]; then
    echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), out: $OUT, budget ${TOTAL_S}s"
    git log -1 --oneline 2>/dev/null || true
    if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing wheels from .whl/: $(ls .whl)"
        "$PY" -m pip install --no-index --no-deps .whl/*.whl || echo "WARNING: wheel install failed"
    fi
    if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
        echo "editable install failed: using PYTHONPATH=$PWD/src"
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "timm", "torchvision", "scipy", "yaml", "pytest", "spikingjelly", "dassdp"):
    try:
        m = importlib.import_module(name)
        print(f"{name:<12} {getattr(m, '__version__', '?')}")
    except Exception as err:  # report, never stop
        print(f"{name:<12} MISSING ({type(err).__name__}: {err})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
    nvidia-smi || echo "nvidia-smi failed"
fi

# ---------------------------------------------------------------- steps, by priority
if [[ $DRY -eq 1 ]] || "$PY" -c "import pytest" 2>/dev/null; then
    step pytest-cuda 170 "$PY" -m pytest -m cuda -q -p no:cacheprovider \
        --junitxml "$OUT/pytest-cuda.xml" tests/test_cuda.py
else
    echo "=== pytest-cuda: SKIPPED: pytest is not installed here (put its wheel in .whl/)"
    STEPS+=("pytest-cuda	not run: no pytest	0")
    FAILED=1
fi
NEURONS=(dassdp dassdp-loop)
if [[ $DRY -eq 0 ]] && "$PY" -c "import spikingjelly.activation_based.neuron" 2>/dev/null; then
    NEURONS=(dassdp spikingjelly dassdp-loop)
fi
step overhead-cifar 45 "${BENCH[@]}" overhead --device cuda --model spikingresformer_cifar \
    --batch 128 --reps 5 --warmup 2
step syncs 45 "${BENCH[@]}" syncs --device cuda
step throughput 30 "${BENCH[@]}" throughput --device cuda --batch 128 --reps 3 --neuron-reps 10 \
    --neurons "${NEURONS[@]}"
step rule 45 "${BENCH[@]}" rule --device cuda --reps 3
step throughput-bf16 25 "${BENCH[@]}" throughput --device cuda --batch 128 --reps 3 --neuron-reps 5 \
    --neurons dassdp --amp bf16 --section "throughput (cuda, bf16)" \
    --out docs/bench/throughput-bf16-cuda.csv
step overhead-imagenet 50 "${BENCH[@]}" overhead --device cuda --model spikingresformer_l \
    --size 224 --batch 16 --reps 3 --warmup 1 --section "overhead (cuda, ImageNet recipe)" \
    --out docs/bench/overhead-imagenet-cuda.csv
step throughput-fp16 25 "${BENCH[@]}" throughput --device cuda --batch 128 --reps 3 --neuron-reps 5 \
    --neurons dassdp --amp fp16 --section "throughput (cuda, fp16)" \
    --out docs/bench/throughput-fp16-cuda.csv
step models 35 "${BENCH[@]}" models --device cuda --batch 16 --iters 3 --amp none bf16 --optimizer
step ddp 40 "${BENCH[@]}" ddp --nproc 1 --device cuda

# ---------------------------------------------------------------- artefacts
if [[ $DRY -eq 1 ]]; then
    exit 0
fi
cp docs/benchmarks.md "$OUT/benchmarks.md"
# shellcheck disable=SC2046
tar czf "$OUT/bench-cuda-csv.tar.gz" $(ls docs/bench/*cuda*.csv 2>/dev/null) 2>/dev/null ||
    echo "no CUDA CSVs to pack"
{
    printf 'step\tstatus\tseconds\n'
    printf '%s\n' "${STEPS[@]}"
} > "$OUT/steps.tsv"
echo
echo "=== summary ($(($(date +%s) - START))s in all)"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
if ((FAILED)); then
    echo "gpu_check: SOME STEPS FAILED"
    exit 1
fi
echo "gpu_check: all steps passed"
