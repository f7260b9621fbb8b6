"""INT8 post-training quantization side by side: fp32 vs our TensorRT-style QDQ export per calibrator vs onnxruntime's.

    python bench/int8_ptq.py [--model builtin:resnet20-cifar10] [--threads 1] [--quick]

Arms, all from the same model and the same calibration images (a manifest in
calibration/, class-balanced training images):
  fp32              export_onnx
  minmax, percentile, entropy, mse
                    export_int8_qdq with that calibrator (one observation pass shared)
  zeroq-<cal>       export_int8_qdq on ZeroQ images synthesized from the BN statistics (no data)
  ort-quantize_static
                    onnxruntime.quantization.quantize_static: QDQ, per-channel, its defaults
                    otherwise (int8 asymmetric activations, MinMax), as a reference
  ort-quantize_static-u8
                    the same with uint8 activations, onnxruntime's advice for x86 CPUs
                    (fast there, but not a graph TensorRT takes)
  <headline>-as-written
                    the headline file run without cifarpress's load-time lowering
                    (cifarpress.runtime.ort_lowering folds each int8 ReLU chain into a uint8 Q that
                    onnxruntime fuses); every other int8 arm runs lowered, as cifarpress runs it
Each arm gets: top-1 through onnxruntime on the test set, agreement of its
predictions with fp32, file size, latency p50 at batch 1 and 64
(cifarpress.runtime.latency.interleaved_latency, fixed threads, arms interleaved in rounds so
machine noise hits them alike, median over rounds), and the number of
TensorRT explicit-quantization rule violations (check_int8_rules).

Writes bench/results/int8_ptq.json and bench/results/<arch>-int8-qdq.onnx (the
--headline calibrator, fixed beforehand rather than picked on the test set).
--quick (development): 1000 test images, 0.3 s of timing per batch size, one
round, the 512-image manifest, a short ZeroQ; it writes int8_ptq-quick.json and
no ONNX file.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table

from cifarpress.runtime.latency import interleaved_latency, machine_description
from cifarpress.runtime.ort import onnx_predictions
from cifarpress.export.calibrate import CALIBRATORS, collect_statistics, load_manifest, manifest_filename, manifest_images, synthesize_images
from cifarpress.utils.io import atomic_write_json
from cifarpress.model_file import load_model
from cifarpress.data import balanced_subset, dataset_spec, load_split
from cifarpress.runtime.onnx_file import INPUT_NAME
from cifarpress.export.onnx import export_onnx
from cifarpress.export.int8 import check_int8_rules, export_int8_qdq, plan_int8
from harness import with_provenance  # bench/harness.py: a script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
FP32 = "fp32"
ORT_REFERENCES = {"ort-quantize_static": "int8", "ort-quantize_static-u8": "uint8"}  # arm -> activation type


def ort_quantize_static(float_path: Path, out: Path, pixels: np.ndarray, activations: str = "int8",
                        batch: int = 64) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(pixels), batch))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {INPUT_NAME: pixels[start:start + batch]}

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice
    activation_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[activations]
    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=activation_type, weight_type=QuantType.QInt8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:resnet20-cifar10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--manifest", default=None, help="default: calibration/<dataset>-train-2048.json (512 quick)")
    parser.add_argument("--calibrators", default=",".join(CALIBRATORS))
    parser.add_argument("--headline", default="entropy", help="calibrator of the published ONNX file")
    parser.add_argument("--zeroq-steps", type=int, default=None, help="0 skips the data-free arm")
    parser.add_argument("--rounds", type=int, default=None, help="latency rounds (default 3, quick 1)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep", default=None, help="folder to keep every arm's ONNX file in (e.g. for ort_op_profile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)  # the table is wider than a default pipe
    quick = args.quick
    seconds, rounds = (0.3, args.rounds or 1) if quick else (3.0, args.rounds or 3)
    zeroq_steps = args.zeroq_steps if args.zeroq_steps is not None else (60 if quick else 500)
    calibrators = [c for c in args.calibrators.split(",") if c]

    model, info = load_model(args.model)
    model.eval()
    arch, dataset = info["arch"], info["dataset"] or "cifar10"
    spec = dataset_spec(dataset)
    train = load_split(dataset, "train", args.data_root)
    test = load_split(dataset, "test", args.data_root)
    manifest_path = Path(args.manifest) if args.manifest else (
        REPO / "calibration" / manifest_filename(dataset, 512 if quick else 2048))
    manifest = load_manifest(manifest_path)
    manifest["file"] = str(manifest_path.resolve().relative_to(REPO)) if manifest_path.resolve().is_relative_to(
        REPO) else str(manifest_path)
    calib = manifest_images(manifest, train).float().numpy() / 255.0
    if quick:
        test = test.subset(balanced_subset(test.labels, 1000, seed=0))
    test_pixels = test.images.numpy().astype(np.float32) / 255.0
    labels = test.labels.numpy()

    arms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        console.print(f"[bold]{args.model}[/] ({arch}, {dataset}); calibration: {manifest['file']} "
                      f"({len(calib)} images); test: {len(test)} images; {args.threads} thread(s)")
        t0 = time.perf_counter()
        fp32_path = export_onnx(model, tmp / "fp32.onnx", spec, test.classes, {"arch": arch})
        arms[FP32] = {"file": fp32_path, "calibration": "-", "build_s": time.perf_counter() - t0}

        t0 = time.perf_counter()
        tensors = plan_int8(onnx.load(str(fp32_path)).graph).calibrated
        observed = collect_statistics(fp32_path, tensors, calib, threads=args.threads)
        observe_s = time.perf_counter() - t0
        for calibrator in calibrators:
            t0 = time.perf_counter()
            path = export_int8_qdq(model, tmp / f"int8-{calibrator}.onnx", spec, test.classes, calib, calibrator,
                                   manifest=manifest, statistics=observed, extra_metadata={"arch": arch},
                                   threads=args.threads)
            arms[calibrator] = {"file": path, "calibration": manifest["file"], "build_s": time.perf_counter() - t0}

        if zeroq_steps:
            t0 = time.perf_counter()
            synthetic = synthesize_images(model, spec, count=32 if quick else 64, steps=zeroq_steps, seed=0)
            name = f"zeroq-{args.headline}"
            path = export_int8_qdq(model, tmp / f"int8-{name}.onnx", spec, test.classes, synthetic.pixels,
                                   args.headline, source=f"zeroq ({len(synthetic.pixels)} images, {zeroq_steps} "
                                   f"steps, BN loss {synthetic.losses[0]:.3g} -> {synthetic.losses[-1]:.3g})",
                                   extra_metadata={"arch": arch}, threads=args.threads)
            arms[name] = {"file": path, "calibration": f"zeroq, {len(synthetic.pixels)} images",
                          "build_s": time.perf_counter() - t0}

        for name, activations in ORT_REFERENCES.items():
            t0 = time.perf_counter()
            path = ort_quantize_static(fp32_path, tmp / f"{name}.onnx", calib, activations)
            arms[name] = {"file": path, "calibration": manifest["file"], "build_s": time.perf_counter() - t0}

        as_written = f"{args.headline}-as-written"
        if args.headline in arms:
            arms[as_written] = dict(arms[args.headline], build_s=0.0)
        console.print(f"built {len(arms)} files; measuring accuracy and latency ...")
        reference = None
        for name, arm in arms.items():
            predicted = onnx_predictions(arm["file"], test_pixels, args.threads, lower=name != as_written)
            reference = predicted if reference is None else reference
            arm["top1"] = 100.0 * float((predicted == labels).mean())
            arm["agreement_with_fp32"] = 100.0 * float((predicted == reference).mean())
            arm["onnx_bytes"] = arm["file"].stat().st_size
            violations = check_int8_rules(arm["file"]) if name != FP32 else []
            arm["trt_rule_violations"] = len(violations)
            arm["first_violations"] = violations[:3]
        latency = interleaved_latency({name: arm["file"] for name, arm in arms.items()}, (1, 64), args.threads,
                                      seconds, rounds, as_written={as_written})
        for name, arm in arms.items():
            arm["latency_rounds"], arm["latency_ms_p50"] = latency["rounds"][name], latency["p50"][name]
            arm["onnxruntime"] = latency["onnxruntime"]
        base = arms[FP32]
        for arm in arms.values():
            arm["latency_vs_fp32"] = {b: arm["latency_ms_p50"][b] / base["latency_ms_p50"][b] for b in ("1", "64")}
            arm["size_vs_fp32"] = arm["onnx_bytes"] / base["onnx_bytes"]
            arm["top1_delta"] = arm["top1"] - base["top1"]

        headline = None
        if not quick and args.headline in arms:
            headline = RESULTS / f"{arch}-int8-qdq.onnx"
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(arms[args.headline]["file"], headline)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for name, arm in arms.items():
                shutil.copyfile(arm["file"], Path(args.keep) / f"{arch}-{name}.onnx")
        for arm in arms.values():
            arm["file"] = arm["file"].name

    result = {
        "model": args.model, "arch": arch, "dataset": dataset, "model_meta_top1": info["meta"].get("top1"),
        "quick": quick, "threads": args.threads, "test_images": len(test), "latency_seconds": seconds,
        "latency_rounds": rounds, "calibration": {k: manifest[k] for k in ("file", "count", "seed")},
        "observe_s": observe_s, "zeroq_steps": zeroq_steps, "headline": {"calibrator": args.headline,
        "file": str(headline.relative_to(REPO)) if headline else None},
        "arms": arms, "machine": machine_description(), "torch": torch.__version__,
    }
    out = Path(args.out) if args.out else RESULTS / ("int8_ptq-quick.json" if quick else "int8_ptq.json")
    atomic_write_json(out, with_provenance(result))

    table = Table(title=f"INT8 PTQ, {arch} on {result['machine']['cpu']}, onnxruntime {base['onnxruntime']}, "
                        f"{args.threads} thread(s), {len(test)} test images")
    for col in ("arm", "top-1 %", "Δ top-1", "agree %", "MB", "b1 ms", "b64 ms", "b1 ×fp32", "b64 ×fp32",
                "TRT rules"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, arm in arms.items():
        lat, ratio = arm["latency_ms_p50"], arm["latency_vs_fp32"]
        table.add_row(name, f"{arm['top1']:.2f}", f"{arm['top1_delta']:+.2f}", f"{arm['agreement_with_fp32']:.1f}",
                      f"{arm['onnx_bytes'] / 1e6:.2f}", f"{lat['1']:.3f}", f"{lat['64']:.2f}",
                      f"{ratio['1']:.2f}", f"{ratio['64']:.2f}",
                      "-" if name == FP32 else ("ok" if not arm["trt_rule_violations"]
                                                else f"{arm['trt_rule_violations']} violations"))
    table.caption = f"wrote {out}" + (f" and {headline}" if headline else "")
    console.print(table)
    for name, arm in arms.items():
        if arm["first_violations"]:
            console.print(f"{name}: e.g. {arm['first_violations'][0]}")


if __name__ == "__main__":
    main()
