#!/usr/bin/env bash
# The prepared GPU check (issue 11): on a fresh GPU machine with PyTorch, Triton, timm,
# torchvision, scipy, PyYAML, matplotlib, tqdm and pytest installed and no network:
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default gpu-check-out/ (git-ignored)
#
# installs this checkout (pip --no-deps -e .; PYTHONPATH=src if that fails), installs wheels
# from .whl/ if that folder exists (SpikingJelly + loguru for `bench throughput`), runs
# `pytest -m cuda`, then `dassdp bench syncs | overhead | throughput | rule --device cuda`,
# which write the `(cuda)` sections of docs/benchmarks.md and docs/bench/*-cuda.csv. Every
# step has its own time limit (the whole script stays under ~6 minutes on one H200), runs
# whatever the previous step did, and its exit status is logged; the script exits non-zero
# if any step failed. OUT_DIR receives 4 files: gpu_check.log,
# benchmarks.md (a copy of the updated docs/benchmarks.md), bench-cuda.tar.gz (the CSVs) and
# status.txt (one line per step).
#
# DRY_RUN=1 prints the steps without running them (tests/test_gpu_check.py uses it).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STATUS="$OUT/status.txt"
: >"$STATUS"
[ "${DRY_RUN:-0}" = 1 ] || : >"$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=0

step() { # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ "${DRY_RUN:-0}" = 1 ]; then
        echo "$name|$limit|$(printf '%q ' "$@")"
        return 0
    fi
    local t0 rc
    t0=$(date +%s)
    echo "=== [$name] (limit ${limit}s, $((t0 - START))s elapsed): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== [$name] exit $rc after $(($(date +%s) - t0))s" | tee -a "$LOG"
    echo "$name $rc $(($(date +%s) - t0))s" >>"$STATUS"
    [ "$rc" = 0 ] || FAILED=1
    cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
    tar czf "$OUT/bench-cuda.tar.gz" docs/bench/*-cuda.csv 2>/dev/null
    return 0
}

if [ "${DRY_RUN:-0}" != 1 ]; then
    {
        echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), revision $(git describe --always --dirty 2>/dev/null || echo unknown)"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1
    } | tee -a "$LOG"
    if [ -d .whl ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl >>"$LOG" 2>&1 &&
            export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! timeout 90 $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
        echo "pip install -e . failed: using PYTHONPATH=src" | tee -a "$LOG"
    fi
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi

step pytest-cuda 120 $PY -m pytest -m cuda -q -ra -p no:cacheprovider -o addopts="" tests/test_cuda.py
step bench-syncs 50 $PY -m dassdp bench syncs --device cuda
step bench-overhead-cifar 60 $PY -m dassdp bench overhead --device cuda --model spikingresformer_cifar --batch 128 --reps 3
step bench-throughput 60 $PY -m dassdp bench throughput --device cuda --batch 32 128 --reps 5 --neurons dassdp spikingjelly dassdp-torch
step bench-rule 40 $PY -m dassdp bench rule --device cuda --sizes classifier-cifar10 projection-cifar classifier-imagenet-l projection-imagenet-l
step bench-overhead-imagenet 50 $PY -m dassdp bench overhead --device cuda --model spikingresformer_l --size 224 --batch 16 --reps 3 --section "overhead (cuda, ImageNet recipe)"

[ "${DRY_RUN:-0}" = 1 ] && exit 0
echo "gpu_check: done in $(($(date +%s) - START))s; failed steps: $(awk '$2 != 0 {print $1}' "$STATUS" | tr '\n' ' ')" | tee -a "$LOG"
exit $FAILED
