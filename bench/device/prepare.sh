# Here, before a device session: wheels for the device's Python 3.12, the exact training images as lossless WebP
# in two halves, and the tp-taylor arm's pruned model (see bench/device/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
D=.device-data; mkdir -p $D/wheels $D/A $D/B
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d $D/wheels \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 torch-pruning==1.6.1
SHARED=${CIFARPRESS_SHARED:-../shared}/data/cifar10-exact
for half in A B; do cp "$SHARED/cifar10_labels.js" $D/$half/; done
cp "$SHARED/cifar10_batch_50.png" $D/A/
.venv/bin/python bench/device/sheets.py "$SHARED" $D $(seq 0 2 49) &
.venv/bin/python bench/device/sheets.py "$SHARED" $D $(seq 1 2 49)
wait
.venv/bin/pip install -q --no-deps torch-pruning==1.6.1  # the arm's pruning runs here
.venv/bin/python bench/device/tp_prune.py $D/B/tp-taylor-resnet56.pt builtin:resnet56-cifar10
du -sh $D/*
