"""How much one more JPEG generation costs: a measured slope for the data handicap.

    python bench/jpeg_sensitivity.py build --quality 50 --dest /tmp/cifar-q50
    python bench/jpeg_sensitivity.py report --degraded /tmp/cifar-q50 \
        [--model builtin:resnet20-cifar10] [--run-base RUN ...] [--run-degraded RUN ...]

The CIFAR-10 copy on this machine is a JPEG re-encoding (quality 75, 4:2:0
chroma, about 30 dB PSNR against the official pixels), and no clean copy can be
fetched, so the cost of that first generation cannot be measured directly.
What can be measured is the next one: `build` re-encodes the local copy once
more (default quality 50, 4:2:0, which is again about 29 dB against its source)
and writes it in the canonical layout, atomically. Training the same recipe on
both copies (`cifarpress train ... --data-root DEST`) then gives the accuracy one
such generation takes away when a model is trained and tested on it.

`report` prints and records (bench/results/jpeg_sensitivity.json): PSNR of the
degraded copy against the source, a trained model's top-1 on both test sets,
and, for finished training runs on each copy, their final top-1 and the
difference of the means.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifarpress.runtime.latency import machine_description
from cifarpress.utils.io import atomic_write_json
from cifarpress.model_file import load_model
from cifarpress.data import load_split, resolve_data_root
from cifarpress.train.trainer import evaluate

RESULTS = Path(__file__).parent / "results"
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def reencode(rows: np.ndarray, quality: int, subsampling: int) -> np.ndarray:
    """JPEG round trip of canonical uint8 rows [N, 3072] (planar RGB)."""
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        buf = io.BytesIO()
        Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(
            buf, "JPEG", quality=quality, subsampling=subsampling)
        out[i] = np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1).reshape(-1)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) between two uint8 row arrays."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def build(source: Path, dest: Path, quality: int, subsampling: int) -> Path:
    src, out = source / "cifar-10-batches-py", dest / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    for name in BATCHES:
        if (out / name).exists():
            continue
        with open(src / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        batch[b"data"] = reencode(batch[b"data"], quality, subsampling)
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(batch, f, protocol=4)
        tmp.rename(out / name)  # atomic: an interrupted build redoes only the missing batches
    shutil.copyfile(src / "batches.meta", out / "batches.meta")
    (out / "reencoding.json").write_text(json.dumps({"quality": quality, "subsampling": subsampling}))
    return out


def final_top1(run: Path) -> float:
    return float(json.loads((run / "metrics.json").read_text())["top1"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--source", default=None, help="data root holding cifar-10-batches-py (default: $CIFARPRESS_DATA)")
    b.add_argument("--dest", required=True)
    b.add_argument("--quality", type=int, default=50)
    b.add_argument("--subsampling", type=int, default=2, help="PIL: 0 = 4:4:4, 2 = 4:2:0")
    r = sub.add_parser("report")
    r.add_argument("--source", default=None)
    r.add_argument("--degraded", required=True)
    r.add_argument("--model", default="builtin:resnet20-cifar10")
    r.add_argument("--run-base", type=Path, nargs="+", default=None,
                   help="training runs on the source copy (several seeds: their mean is the reference)")
    r.add_argument("--run-degraded", type=Path, nargs="+", default=None, help="same command on the degraded copy")
    r.add_argument("--train-command", default=None, help="the training command both sides ran, to record")
    r.add_argument("--out", type=Path, default=RESULTS / "jpeg_sensitivity.json")
    a = p.parse_args()
    # imported here, not at the top: tests load this file by path for its helpers, with bench/ not on sys.path
    from harness import with_provenance  # bench/harness.py, beside this script

    source = resolve_data_root(a.source)
    if a.cmd == "build":
        print(build(source, Path(a.dest), a.quality, a.subsampling))
        return

    degraded = Path(a.degraded)
    torch.set_num_threads(1)
    clean_test, worse_test = load_split("cifar10", "test", source), load_split("cifar10", "test", degraded)
    result = {
        "machine": machine_description(),
        "reencoding": json.loads((degraded / "cifar-10-batches-py" / "reencoding.json").read_text()),
        "psnr_db_vs_source": {"test": psnr(clean_test.images.reshape(len(clean_test.labels), -1).numpy(),
                                           worse_test.images.reshape(len(worse_test.labels), -1).numpy())},
    }
    model = load_model(a.model)[0].eval()
    result["model"] = a.model
    result["model_top1"] = {"source_test": evaluate(model, clean_test), "degraded_test": evaluate(model, worse_test)}
    if a.run_base and a.run_degraded:
        runs = {side: {str(run): final_top1(run) for run in paths}
                for side, paths in (("source", a.run_base), ("degraded", a.run_degraded))}
        means = {side: float(np.mean(list(top1s.values()))) for side, top1s in runs.items()}
        result["trained"] = {side: {"runs": runs[side], "mean_top1": means[side]} for side in runs}
        result["trained"]["delta_pp"] = means["degraded"] - means["source"]
        result["trained"]["command"] = a.train_command
    atomic_write_json(a.out, with_provenance(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
