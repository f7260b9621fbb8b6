#!/usr/bin/env bash
# Set up cifarpress from nothing: a virtualenv in .venv, the CPU build of torch,
# the package with its test extras, and CIFAR-10 in data/ (built from ../shared/data
# when that folder exists: the official training pixels, test images 0-999 official and
# 1000-9999 JPEG; otherwise the loader downloads the official archive on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, onnxruntime, cifarpress" || { echo "setup failed: see pip output above" >&2; exit 1; }
# The official training pixels and test images 0-999; test images 1000-9999 exist here only as JPEG.
# The build script is idempotent: a copy already built with these options is left as it is.
if [ -f ../shared/data/build_cifar10.py ]; then
  .venv/bin/python ../shared/data/build_cifar10.py data --train exact --test mixed >/dev/null
fi
echo "setup done: .venv ready; CIFAR-10 in $(pwd)/data (export CIFARPRESS_DATA=\$PWD/data)"
