"""Ternary (BitNet b1.58) ResNet-20 side by side with its fp32 baseline, on the full CIFAR-10 test set.

    python bench/ternary.py [--recipe recipes/resnet20-ternary.yaml] [--run DIR] [--threads 1]

Runs the recipe (or resumes it: a finished run folder is reused as it is), then
measures, for the baseline and the ternary model:
  * top-1 in PyTorch (the ternary one as fake-quant) and through onnxruntime on
    the exported file (fp32 graph / QDQ graph), and the ternary QDQ graph's top-1
    agreement with the PyTorch fake-quant model;
  * file sizes: fp32 ONNX, QDQ ONNX (int8 storage), packed 2-bit file, and the
    packed file's ratio to the fp32 ONNX;
  * that the packed file reloads bit-exactly: every ternary code and scale and
    every other tensor equal, and identical logits on the test images;
  * onnxruntime CPU latency p50 at batch 1 and 64, the graphs interleaved in
    rounds (medians), fixed threads: the ternary graph as cifarpress runs it (its
    weights dequantized once at load, cifarpress.runtime.ort_lowering) and as written.
Writes bench/results/ternary.json, bench/results/<arch>-ternary-qdq.onnx and
bench/results/<arch>-ternary.packed.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cifarpress.runtime.latency import interleaved_latency, machine_description
from cifarpress.runtime.ort import onnx_predictions
from cifarpress.utils.io import atomic_write_json
from cifarpress.model_file import load_model
from cifarpress.pipeline.compress import run_recipe
from cifarpress.data import load_split
from cifarpress.export.onnx import NormalizedClassifier
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.techniques.quantize.ternary import layer_report, quantized_layers
from cifarpress.export.packed import load_packed
from cifarpress.pipeline.recipe import load_recipe
from harness import with_provenance  # bench/harness.py: a script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def torch_logits(model: torch.nn.Module, onnx_path: Path, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Logits of the PyTorch model on [0, 1] pixels, normalized as the exported file says."""
    preprocessing = json.loads(read_onnx_metadata(onnx_path)["preprocessing"])
    wrapped = NormalizedClassifier(model, preprocessing["mean"], preprocessing["std"]).eval()
    return torch.cat([wrapped(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def bit_exact(model: torch.nn.Module, reloaded: torch.nn.Module) -> dict:
    """Compare a trained fake-quant model with its packed reload, tensor by tensor (deployed codes and scales)."""
    mismatched = []
    original, again = quantized_layers(model), quantized_layers(reloaded)
    for name, layer in original.items():
        with torch.no_grad():
            pairs = ((layer.weight_codes(), again[name].weight_codes(), "codes"),
                     (layer.weight_scale(), again[name].weight_scale(), "scale"))
        for a, b, part in pairs:
            if not torch.equal(a, b):
                mismatched.append(f"{name}.{part}")
    skip = {f"{n}.{p}" for n in original for p in ("weight", "frozen_scale")}  # latent weights are not shipped
    theirs = reloaded.state_dict()
    for key, value in model.state_dict().items():
        if key not in skip and not torch.equal(value, theirs[key]):
            mismatched.append(key)
    return {"tensors_mismatched": mismatched[:10], "count_mismatched": len(mismatched)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "resnet20-ternary.yaml"))
    parser.add_argument("--run", default=None, help="run folder (default runs/<recipe name>)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per batch size and round")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=140)

    recipe = load_recipe(args.recipe)
    run_dir = run_recipe(recipe, Path(args.run) if args.run else None, args.data_root)
    report = json.loads((run_dir / "report.json").read_text())
    rows = {row["stage"]: row for row in report["stages"]}
    base_row, tern_row = rows["baseline"], rows["quantize"]
    baseline, info = load_model(base_row["model"])
    ternary, _ = load_model(tern_row["model"])
    baseline.eval(), ternary.eval()
    arch = info["arch"]
    fp32_onnx, qdq_onnx = Path(base_row["onnx"]), Path(tern_row["onnx"])
    packed = Path(tern_row["packed"])

    test = load_split(recipe.dataset, "test", args.data_root)
    labels = test.labels.numpy()
    pixels = test.images.float() / 255.0
    console.print(f"[bold]{run_dir}[/]: measuring on {len(test)} test images, {args.threads} thread(s)")

    logits_fp32 = torch_logits(baseline, fp32_onnx, pixels)
    logits_tern = torch_logits(ternary, qdq_onnx, pixels)
    reloaded = load_packed(packed)
    logits_reloaded = torch_logits(reloaded, qdq_onnx, pixels)
    ort_fp32 = onnx_predictions(fp32_onnx, pixels.numpy(), args.threads)
    ort_tern = onnx_predictions(qdq_onnx, pixels.numpy(), args.threads)
    torch_tern = logits_tern.argmax(1).numpy()

    def top1(predicted: np.ndarray) -> float:
        return 100.0 * float((predicted == labels).mean())

    latency = interleaved_latency({"fp32": fp32_onnx, "ternary-qdq": qdq_onnx, "ternary-qdq-as-written": qdq_onnx},
                                  (1, 64), args.threads, args.seconds, args.rounds,
                                  as_written={"ternary-qdq-as-written"})
    latency_p50 = latency["p50"]

    stage_cfg = next(s.config for s in recipe.stages if s.kind == "quantize")
    result = {
        "recipe": str(Path(args.recipe).resolve().relative_to(REPO)) if Path(args.recipe).resolve().is_relative_to(
            REPO) else args.recipe,
        "arch": arch, "dataset": recipe.dataset, "test_images": len(test), "threads": args.threads,
        "budget": {"epochs": stage_cfg.epochs, "lr": stage_cfg.lr, "schedule": stage_cfg.schedule,
                   "from": recipe.model.checkpoint, "scale": stage_cfg.scale, "granularity": stage_cfg.granularity},
        "top1": {"fp32_torch": top1(logits_fp32.argmax(1).numpy()), "fp32_onnxruntime": top1(ort_fp32),
                 "ternary_torch_fake_quant": top1(torch_tern), "ternary_qdq_onnxruntime": top1(ort_tern),
                 "ternary_packed_reload": top1(logits_reloaded.argmax(1).numpy())},
        "ternary_qdq_agreement_with_torch": 100.0 * float((ort_tern == torch_tern).mean()),
        "bytes": {"fp32_onnx": fp32_onnx.stat().st_size, "ternary_qdq_onnx": qdq_onnx.stat().st_size,
                  "ternary_packed": packed.stat().st_size},
        "packed_reload": {**bit_exact(ternary, reloaded),
                          "logits_identical": bool(torch.equal(logits_tern, logits_reloaded))},
        "latency_ms_p50": latency_p50, "latency_rounds": latency["rounds"],
        "layers": layer_report(ternary), "machine": machine_description(), "torch": torch.__version__,
        "onnxruntime": latency["onnxruntime"],
    }
    result["top1"]["drop_pp"] = result["top1"]["fp32_onnxruntime"] - result["top1"]["ternary_qdq_onnxruntime"]
    result["packed_vs_fp32_onnx"] = result["bytes"]["ternary_packed"] / result["bytes"]["fp32_onnx"]
    result["latency_vs_fp32"] = {b: latency_p50["ternary-qdq"][b] / latency_p50["fp32"][b] for b in ("1", "64")}
    result["as_written_latency_vs_fp32"] = {b: latency_p50["ternary-qdq-as-written"][b] / latency_p50["fp32"][b]
                                            for b in ("1", "64")}

    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(qdq_onnx, RESULTS / f"{arch}-ternary-qdq.onnx")
    shutil.copyfile(packed, RESULTS / f"{arch}-ternary.packed")
    result["files"] = [f"bench/results/{arch}-ternary-qdq.onnx", f"bench/results/{arch}-ternary.packed"]
    out = RESULTS / "ternary.json"
    atomic_write_json(out, with_provenance(result))

    t = result["top1"]
    table = Table(title=f"Ternary {arch} vs fp32, {len(test)} test images, {result['machine']['cpu']}, "
                        f"{args.threads} thread(s)")
    for col in ("model", "top-1 torch %", "top-1 ORT %", "file", "bytes", "b1 ms", "b64 ms"):
        table.add_column(col, justify="left" if col in ("model", "file") else "right")
    table.add_row("fp32", f"{t['fp32_torch']:.2f}", f"{t['fp32_onnxruntime']:.2f}", "ONNX",
                  f"{result['bytes']['fp32_onnx']:,}", f"{latency_p50['fp32']['1']:.3f}",
                  f"{latency_p50['fp32']['64']:.2f}")
    table.add_row("ternary", f"{t['ternary_torch_fake_quant']:.2f}", f"{t['ternary_qdq_onnxruntime']:.2f}",
                  "QDQ ONNX", f"{result['bytes']['ternary_qdq_onnx']:,}", f"{latency_p50['ternary-qdq']['1']:.3f}",
                  f"{latency_p50['ternary-qdq']['64']:.2f}")
    table.add_row("ternary", "-", "-", "QDQ ONNX as written", f"{result['bytes']['ternary_qdq_onnx']:,}",
                  f"{latency_p50['ternary-qdq-as-written']['1']:.3f}", f"{latency_p50['ternary-qdq-as-written']['64']:.2f}")
    table.add_row("ternary", f"{t['ternary_packed_reload']:.2f}", "-", "packed 2-bit",
                  f"{result['bytes']['ternary_packed']:,}", "-", "-")
    table.caption = (f"drop {t['drop_pp']:.2f} pp; QDQ/torch agreement {result['ternary_qdq_agreement_with_torch']:.2f}%; "
                     f"packed = {result['packed_vs_fp32_onnx']:.3f}x fp32 ONNX; reload mismatches "
                     f"{result['packed_reload']['count_mismatched']}, logits identical "
                     f"{result['packed_reload']['logits_identical']}; wrote {out}")
    console.print(table)


if __name__ == "__main__":
    main()
