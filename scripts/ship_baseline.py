"""Ship a retrained baseline (issue 21): measure it, record the figures in the model file, and put it in place.

    .venv/bin/python scripts/ship_baseline.py RUN_DIR NAME [--data-root DIR]

RUN_DIR is a finished `cifarpress train` folder (scripts/retrain_baselines.sh); NAME the builtin it becomes
(resnet20-cifar10 -> cifarpress/pretrained/resnet20-cifar10.pt). Its final epoch ships as it is (no model
selection on the test set). The file's meta gains `accuracy`: top-1 on the official test images 0-999 with
its standard error, and on all 10,000 (images 1000-9999 JPEG), plus the data it was trained on. Then export
it with `cifarpress export builtin:NAME -o bench/results/<arch>-fp32.onnx`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cifarpress.pipeline.evaluate import accuracy_summary
from cifarpress.data import describe_split, load_split
from cifarpress.model_file import BUILTIN_DIR, load_model, read_checkpoint
from cifarpress.train.trainer import predict
from cifarpress.utils.io import atomic_torch_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--data-root")
    args = parser.parse_args()
    source = args.run_dir / "model.pt"
    model, info = load_model(source)
    test = load_split(info["dataset"], "test", args.data_root)
    train = load_split(info["dataset"], "train", args.data_root)
    summary = accuracy_summary(f"builtin:{args.name}", test, (predict(model, test) == test.labels).numpy())
    payload = read_checkpoint(source)
    payload["meta"] = {**payload["meta"], "accuracy": summary, "train_set": describe_split(train)}
    target = atomic_torch_save(payload, BUILTIN_DIR / f"{args.name}.pt")
    print(f"{target}: {summary}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
