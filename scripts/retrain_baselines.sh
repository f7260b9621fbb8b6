#!/usr/bin/env bash
# Retrain the shipped baselines on the official CIFAR-10 training pixels (issue 21), resumably:
#
#   bash scripts/retrain_baselines.sh RUNS_DIR [resnet20|resnet56|all]
#
# Each training writes RUNS_DIR/<model>-<epochs>ep-ls/ (last.pt after every epoch, then model.pt and
# metrics.json); re-running the same command resumes after the last finished epoch, so a training
# longer than one session simply continues in the next. THREADS (default 2) sets torch's threads.
# The test figures printed per epoch are for watching only: the final epoch's EMA weights ship,
# whatever the test set says (no model selection on it).
set -euo pipefail
RUNS=${1:?usage: retrain_baselines.sh RUNS_DIR [resnet20|resnet56|all]}
WHICH=${2:-all}
cd "$(dirname "$0")/.."
DATA="$RUNS/data"
mkdir -p "$RUNS"
.venv/bin/python ../shared/data/build_cifar10.py "$DATA" --train exact --test mixed >/dev/null

train() {  # model epochs
  .venv/bin/cifarpress train --model "$1" --epochs "$2" --lr 0.2 --ema --label-smoothing 0.1 \
    --threads "${THREADS:-2}" --out "$RUNS/$1-$2ep-ls" --data-root "$DATA"
}
if [ "$WHICH" != resnet56 ]; then train resnet20 50; fi
if [ "$WHICH" != resnet20 ]; then train resnet56 50; fi
