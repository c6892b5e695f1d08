#!/usr/bin/env bash
# Stress the multi-process paths, to show that a rank never aborts at teardown:
#
#     bash scripts/stress_ddp.sh N          # default N = 5
#
# Each of the N rounds runs (1) the two DDP test files (tests/test_distributed_learner.py:
# mp.spawn workers; tests/test_distributed_train.py: `dassdp train --nproc 2` under torchrun)
# and (2) one real `dassdp train --config configs/demo.yaml --nproc 2` run, tiny (2 epochs
# of 4 batches, 1-epoch warm-up: the gate fit and active DA-SSDP steps both run), on
# Fashion-MNIST (prepared on first use: `dassdp data prepare fashion-mnist`). A round fails
# if any command exits non-zero or prints "terminate called" (the gloo abort) anywhere.
# Prints one line per command and "failures/rounds" at the end; exits non-zero on any failure.
# Logs: $STRESS_DIR (default a new folder under /tmp), one file per command.
set -u
cd "$(dirname "$0")/.."
N=${1:-5}
case $N in '' | *[!0-9]* | 0) echo "usage: $0 N (rounds, a positive integer)" >&2; exit 2 ;; esac
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DIR=${STRESS_DIR:-$(mktemp -d /tmp/stress_ddp.XXXXXX)}
mkdir -p "$DIR"
export OMP_NUM_THREADS=1
"$PY" -m dassdp data prepare fashion-mnist >"$DIR/prepare.log" 2>&1 || {
    echo "data prepare fashion-mnist failed: see $DIR/prepare.log" >&2
    exit 2
}

FAILED_ROUNDS=0
START=$(date +%s)

check() { # check NAME LOG RC: 0 if the command passed and nothing aborted
    local name=$1 log=$2 rc=$3 aborts
    aborts=$(grep -c "terminate called" "$log")
    if [ "$rc" = 0 ] && [ "$aborts" = 0 ]; then
        echo "  $name: ok"
        return 0
    fi
    echo "  $name: FAILED (exit $rc, $aborts 'terminate called'; log $log)"
    return 1
}

for i in $(seq "$N"); do
    echo "round $i/$N ($(($(date +%s) - START)) s elapsed)"
    ok=1
    log="$DIR/round$i-tests.log"
    "$PY" -m pytest -q -p no:cacheprovider -m distributed \
        tests/test_distributed_learner.py tests/test_distributed_train.py >"$log" 2>&1
    check "DDP test files" "$log" $? || ok=0
    log="$DIR/round$i-train.log"
    "$PY" -m dassdp train --config configs/demo.yaml --nproc 2 --out "$DIR/run$i" \
        epochs=2 plasticity.warmup_epochs=1 limit_train_batches=4 test_subset=256 >"$log" 2>&1
    check "dassdp train --nproc 2" "$log" $? || ok=0
    [ "$ok" = 1 ] || FAILED_ROUNDS=$((FAILED_ROUNDS + 1))
done
echo "stress_ddp: $FAILED_ROUNDS/$N rounds failed in $(($(date +%s) - START)) s (logs: $DIR)"
[ "$FAILED_ROUNDS" = 0 ]
