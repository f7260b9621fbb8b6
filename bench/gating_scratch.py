"""Consensus gating from random initialization vs the dense network, one training pass each, same schedule.

    python bench/gating_scratch.py --arch resnet56 --macs 0.5 --epochs 30 [--threads 2] [--arms dense,gating]
                                   [--train-only] [--rerun ARM,...] [--work W]

Arms (each in its own resumable folder under --work, default runs/bench-gating-scratch/<arch>-<E>ep/<arm>/):
  dense           the architecture trained from random initialization for E epochs with
                  `cifarpress train`'s defaults (SGD, one-cycle, label smoothing 0.1, seed 0);
  gating          the same initialization, schedule and seed, with the prune stage's gating
                  plug-in (`method: gating`, --macs, widths in multiples of --channel-multiple,
                  residual branches may go whole): the gates learn from the first step, the mask
                  freezes at --end-fraction of the steps and the rest trains the static sub-network,
                  so one pass ends with the compact model;
  gating-dynamic  the same with per-sample gates pushed to a consensus (`gates: dynamic`).

Comparison, in one run once every arm has finished: top-1 through onnxruntime on the full test set,
params and MACs, ONNX bytes and onnxruntime latency p50 at batch 1 and 64, the arms timed in turn
(cifarpress.runtime.latency.compare_onnx). Writes bench/results/gating_scratch-<arch>.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console

from cifarpress.data import dataset_spec, load_split
from cifarpress.export.onnx import check_onnx, export_onnx
from cifarpress.model_file import load_model
from cifarpress.pipeline.compress import stage_plugins
from cifarpress.pipeline.recipe import stage_body
from cifarpress.pipeline.training import run_training
from cifarpress.profile import profile_model
from cifarpress.runtime.latency import compare_onnx
from harness import Arms, write_results  # bench/harness.py: a script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
GATES = {"gating": "static", "gating-dynamic": "dynamic"}
ARMS = ("dense", *GATES)


def gating_stage(args, gates: str):
    return stage_body("prune", method="gating", macs=args.macs, channel_multiple=args.channel_multiple,
                      remove_branches=True, gates=gates, start_fraction=0.0, end_fraction=args.end_fraction,
                      epochs=args.epochs)


def train_arm(arm: str, args, out: Path) -> dict:
    spec = dataset_spec(args.dataset)
    plugins = [] if arm == "dense" else stage_plugins("prune", gating_stage(args, GATES[arm]), spec.num_classes, "")
    run_training(arch=args.arch, dataset=args.dataset, epochs=args.epochs, out_dir=out, data_root=args.data_root,
                 plugins=plugins, max_steps_per_epoch=args.max_steps_per_epoch)
    return {"threads": args.threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--macs", type=float, default=0.5, help="fraction of MACs the gated model keeps")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--channel-multiple", type=int, default=16)
    parser.add_argument("--end-fraction", type=float, default=0.5, help="share of the steps before the mask freezes")
    parser.add_argument("--arms", default="dense,gating")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--rerun", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--work", default=None)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="smoke tests only")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or not set(arms) <= set(ARMS):
        parser.error(f"--arms takes some of {', '.join(ARMS)}")
    work = Path(args.work) if args.work else REPO / "runs" / "bench-gating-scratch" / f"{args.arch}-{args.epochs}ep"
    trained = Arms(work, {a for a in args.rerun.split(",") if a}, log=console.print)
    for arm in arms:
        console.rule(f"[bold]{arm}")
        trained.run(arm, lambda out, arm=arm: train_arm(arm, args, out))
    if args.train_only:
        return

    spec = dataset_spec(args.dataset)
    test = load_split(args.dataset, "test", args.data_root)
    models = {arm: load_model(trained.folder(arm) / "model.pt")[0] for arm in arms}
    files = {}
    for arm, model in models.items():
        files[arm] = export_onnx(model, work / "onnx" / f"{arm}.onnx", spec, test.classes,
                                 {"arch": args.arch, "bench": "gating_scratch", "arm": arm})
        check_onnx(model, files[arm], test, 1000, 1e-4, args.threads)
    compared = compare_onnx(list(files.values()), (1, 64), args.threads, test, args.seconds, args.rounds)
    results = {}
    for (arm, model), row in zip(models.items(), compared["models"]):
        prof = profile_model(model)
        results[arm] = {"top1_onnxruntime": row["top1"], "top1_delta_pp": row["top1_delta_pp"],
                        "params": prof.params, "macs": prof.macs, "onnx_bytes": row["onnx_bytes"],
                        "latency_ms_p50": row["latency_ms_p50"], "latency_vs_first": row["latency_vs_first"],
                        "train_s": (trained.record(arm) or {}).get("wall_s")}
    first = results[arms[0]]["macs"]
    for r in results.values():
        r["macs_vs_first"] = r["macs"] / first
    out = {"arch": args.arch, "dataset": args.dataset, "macs_target": args.macs, "epochs": args.epochs,
           "channel_multiple": args.channel_multiple, "end_fraction": args.end_fraction,
           "max_steps_per_epoch": args.max_steps_per_epoch, "test_images": len(test), "threads": args.threads,
           "arms": results, "machine": compared["machine"], "onnxruntime": compared["onnxruntime"]}
    path = Path(args.out) if args.out else RESULTS / f"gating_scratch-{args.arch}.json"
    write_results(path, out)
    for arm, r in results.items():
        console.print(f"{arm:15s} top-1 {r['top1_onnxruntime']:.2f}% ({r['top1_delta_pp']:+.2f} pp)  "
                      f"MACs {r['macs_vs_first']:.3f}x  b64 {r['latency_vs_first']['64']:.2f}x")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
