#!/usr/bin/env bash
# The prepared GPU check: on a GPU machine without network, from a copy of this checkout
# carried with the git-ignored .whl/ folder (`make wheels` fills it: pytest and its
# dependencies, SpikingJelly 2.0.0 and loguru):
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default gpu-check-out/ (git-ignored)
#
# 1. wheels: installs, offline (pip --no-index --no-deps), the wheels of .whl/ whose package
#    the machine lacks into a temporary folder on PYTHONPATH (never over the machine's own);
# 2. nvidia-smi, then the preflight (scripts/gpu_preflight.py): every required package
#    (torch with a CUDA device, triton, timm, torchvision, numpy, scipy, PyYAML, matplotlib,
#    tqdm, pytest) must import, or the check stops here, exit status 1, with one line per
#    missing package saying what failed and how to get it. An optional package that is absent
#    (SpikingJelly) only drops the row that needs it, with a note in the log and status.txt;
# 3. `pytest -m cuda`, then `dassdp bench syncs | overhead | throughput | rule --device cuda`,
#    which write the `(cuda)` sections of docs/benchmarks.md and docs/bench/*-cuda.csv.
# The checkout runs from src/ through PYTHONPATH (the benches' subprocesses inherit it): no
# install. Every command has its own time limit (below), runs whatever the previous one did,
# and its exit status is logged; the script exits non-zero if any step failed. OUT_DIR
# receives gpu_check.log, benchmarks.md (the updated docs/benchmarks.md), bench-cuda.tar.gz
# (the CSVs) and status.txt (one line per command).
#
# DRY_RUN=1 prints each timed command as `name|limit|command` on stdout without running it,
# except the preflight, which runs (without the CUDA device check; its lines go to stderr)
# because it decides the throughput step's rows. tests/test_gpu_check.py uses it.
#
# Time limits, seconds. Each has at least 50 % margin over what one H200 measured (the runs
# of 2026-11-30, docs/bench/gpu-check/), or, where the step never ran to its end there, over
# an estimate said next to it. Worst case, every command running to its limit and then
# KILL_GRACE more: 417 + 9 x 5 = 462 s, under 8 minutes (tests/test_gpu_check.py checks it).
KILL_GRACE=5          # SIGINT at the limit (pytest prints its summary), SIGKILL this much later
LIMIT_WHEELS=15       # pip --no-index of the 2-7 wheels a machine lacks: 5 s on a loaded 2-core CPU
LIMIT_SMI=10          # one nvidia-smi query: about 1 s (driver initialisation included)
LIMIT_PREFLIGHT=25    # H200: the versions line (import torch, triton, device name) and an
                      # editable pip install took 7 s and 10 s together; the extra imports
                      # (timm, scipy, matplotlib, spikingjelly) add about 3 s
LIMIT_PYTEST=150      # H200: 37 s and 41 s with every Triton test failing at its first launch;
                      # passing adds about 60 Triton compiles (0.6-1.2 s each measured for
                      # sm_90 on a 2-core CPU at load 17, so ~0.2 s on a free core), the
                      # float64 references, the inductor and dynamo compiles and the tiny
                      # trainings: ~100 s estimated
LIMIT_SYNCS=40        # H200: 10 s and 14 s for the loop and torch rows before the triton row
                      # failed; the triton row (same work + compiles) makes ~24 s
LIMIT_OVERHEAD_CIFAR=40     # H200: failed at 8-9 s (start-up, 3 models built); ~12 steps of
                            # batch 128, the profiled and peak-memory steps: ~21 s estimated
LIMIT_THROUGHPUT=45   # H200: failed at 7-9 s; 48 training steps of batch 32 and 128 over 3
                      # neuron kinds plus 6 profiled: ~30 s estimated
LIMIT_RULE=52         # H200: 27 s and 34 s (measured to the end): 34 x 1.5 = 51
LIMIT_OVERHEAD_IMAGENET=40  # H200: failed at 8-10 s; ~20 steps of spikingresformer_l at
                            # 224 x 224, batch 16: ~25 s estimated
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
DRY=${DRY_RUN:-0}
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
STATUS="$OUT/status.txt"
START=$(date +%s)
FAILED=0
FAILED_STEPS=""
NEURONS="dassdp spikingjelly dassdp-torch"
mkdir -p "$OUT"
: >"$STATUS"
[ "$DRY" = 1 ] || : >"$LOG"
export PYTHONUNBUFFERED=1

say() { # a line for the log (stderr in a dry run)
    if [ "$DRY" = 1 ]; then echo "$*" >&2; else echo "$*" | tee -a "$LOG"; fi
}

timed() { # timed NAME LIMIT_S COMMAND... : run it under its limit, log it; sets RC
    local name=$1 limit=$2 t0
    shift 2
    RC=0
    if [ "$DRY" = 1 ]; then
        echo "$name|$limit|$(printf '%q ' "$@")"
        return 0
    fi
    t0=$(date +%s)
    say "=== [$name] (limit ${limit}s, $((t0 - START))s elapsed): $*"
    timeout --signal=INT --kill-after="$KILL_GRACE" "$limit" "$@" >>"$LOG" 2>&1
    RC=$?
    say "=== [$name] exit $RC after $(($(date +%s) - t0))s"
    echo "$name $RC $(($(date +%s) - t0))s" >>"$STATUS"
}

step() { # step NAME LIMIT_S COMMAND... : a timed check step; a failure fails the check
    timed "$@"
    [ "$RC" = 0 ] || { FAILED=1; FAILED_STEPS="$FAILED_STEPS $1"; }
    if [ "$DRY" != 1 ]; then
        cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
        tar czf "$OUT/bench-cuda.tar.gz" docs/bench/*-cuda.csv 2>/dev/null
    fi
}

preflight() { # the package check; stops the script if a required package is missing
    local report
    timed preflight "$LIMIT_PREFLIGHT" "$PY" scripts/gpu_preflight.py check
    if [ "$DRY" = 1 ]; then # a CPU machine under load: a wide limit, no CUDA device needed
        report=$(timeout 600 "$PY" scripts/gpu_preflight.py check --no-cuda 2>&1)
        RC=$?
        echo "$report" >&2
    else # only the preflight writes lines that start with "MISSING  " or "absent   "
        report=$(grep -E '^(MISSING|absent) ' "$LOG")
    fi
    if [ "$RC" != 0 ]; then
        [ "$DRY" = 1 ] || grep -E '^(MISSING|preflight:) ' "$LOG"
        say "gpu_check: stopped: the preflight failed (exit $RC); nothing else ran"
        exit 1
    fi
    if grep -q '^absent   spikingjelly ' <<<"$report"; then
        NEURONS="dassdp dassdp-torch"
        say "note: spikingjelly does not import: bench throughput runs without its spikingjelly row"
        echo "bench-throughput-spikingjelly skipped (optional package absent)" >>"$STATUS"
    fi
}

if [ "$DRY" != 1 ]; then
    say "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), revision $(git describe --always --dirty 2>/dev/null || echo unknown)"
fi
SITE=/tmp/gpu-check-site.XXXXXX # made by mktemp when wheels are installed
if [ "$DRY" = 1 ] || compgen -G ".whl/*.whl" >/dev/null; then
    if [ "$DRY" != 1 ]; then
        SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
        trap 'rm -rf "$SITE"' EXIT
    fi
    timed wheels "$LIMIT_WHEELS" "$PY" scripts/gpu_preflight.py wheels .whl "$SITE"
    [ "$RC" = 0 ] || say "note: installing .whl/ failed (exit $RC); the preflight says what is missing"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
    say "note: no .whl/ here (make wheels): pytest and SpikingJelly must be on the machine"
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
timed nvidia-smi "$LIMIT_SMI" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
preflight

read -r -a NEURON_ARGS <<<"$NEURONS"
step pytest-cuda "$LIMIT_PYTEST" "$PY" -m pytest -m cuda -q -ra -p no:cacheprovider -o addopts="" tests/test_cuda.py
step bench-syncs "$LIMIT_SYNCS" "$PY" -m dassdp bench syncs --device cuda
step bench-overhead-cifar "$LIMIT_OVERHEAD_CIFAR" "$PY" -m dassdp bench overhead --device cuda --model spikingresformer_cifar --batch 128 --reps 3
step bench-throughput "$LIMIT_THROUGHPUT" "$PY" -m dassdp bench throughput --device cuda --batch 32 128 --reps 5 --neurons "${NEURON_ARGS[@]}"
step bench-rule "$LIMIT_RULE" "$PY" -m dassdp bench rule --device cuda --sizes classifier-cifar10 projection-cifar classifier-imagenet-l projection-imagenet-l
step bench-overhead-imagenet "$LIMIT_OVERHEAD_IMAGENET" "$PY" -m dassdp bench overhead --device cuda --model spikingresformer_l --size 224 --batch 16 --reps 3 --section "overhead (cuda, ImageNet recipe)"

[ "$DRY" = 1 ] && exit 0
say "gpu_check: done in $(($(date +%s) - START))s; failed steps:${FAILED_STEPS:- none}"
exit $FAILED
