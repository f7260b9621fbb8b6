"""Does distillation help? The same student trained alone and with a teacher, same budget, side by side.

    python bench/distill.py --teacher builtin:resnet56-cifar10 [--student resnet20] [--epochs 5]
                            [--methods kd] [--threads 1] [--arms alone,kd] [--rerun ARM,...]

Every arm trains the student from the same random initialization (same seed,
same data order, same schedule, same EMA), in its own resumable folder under
--work (default runs/bench-distill/<student>-<epochs>ep/<arm>/); the only
difference is the distillation plug-in. "alone" trains on the labels only; each
method in --methods adds that loss from the frozen teacher. Arms may run in
separate processes (--arms kd in one, --arms alone in another); a final run
finds them finished and writes the comparison. An arm is finished once its
seconds.json (wall time, threads, provenance: commit, command, machine) is
written; --rerun trains an arm again from scratch, the old folder kept beside it
as <arm>.replaced-<time> (bench/harness.py).

Writes bench/results/distill[-TAG].json (top-1 of each arm through onnxruntime on the
full test set, the gain over "alone", the teacher's top-1, the budget and the
seconds per epoch) and bench/results/<student>-<arm>[-TAG].onnx for each arm. --tag TAG
keeps a second budget's results beside the first's; give it to every invocation, since
whichever one finds all arms trained writes the comparison.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cifarpress.runtime.latency import machine_description
from cifarpress.runtime.ort import onnx_accuracy
from cifarpress.utils.io import atomic_write_json
from cifarpress.model_file import load_model
from cifarpress.data import dataset_spec, load_split
from cifarpress.techniques.distill.plugin import Distillation
from cifarpress.pipeline.teacher import load_teacher
from cifarpress.export.onnx import check_onnx, export_onnx
from cifarpress.train.trainer import evaluate
from cifarpress.pipeline.training import run_training
from harness import Arms, with_provenance  # bench/harness.py: a script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="builtin:resnet56-cifar10")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--methods", default="kd", help="comma list of kd, dkd, nkd")
    parser.add_argument("--arms", default=None, help="train only these arms now (default: alone + every method)")
    parser.add_argument("--rerun", default="", metavar="ARM,...",
                        help="train these arms again from scratch even if finished (the old folder is kept "
                             "as <arm>.replaced-<time>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the arms' runs")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="smoke tests only")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--tag", default="", help="name suffix for the result files (e.g. 30ep: distill-30ep.json, "
                                                  "<student>-<arm>-30ep.onnx), so a second budget keeps the first")
    args = parser.parse_args()
    if "/" in args.tag or "\\" in args.tag:
        parser.error(f"--tag {args.tag!r} is a file-name suffix; it cannot contain a path separator")
    suffix = f"-{args.tag}" if args.tag else ""
    torch.set_num_threads(args.threads)
    console = Console(width=140)

    methods = [m for m in args.methods.split(",") if m]
    all_arms = ["alone"] + methods
    arms = [a for a in (args.arms.split(",") if args.arms else all_arms) if a]
    unknown = sorted(set(arms) - set(all_arms))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {all_arms}")
    rerun = {a for a in args.rerun.split(",") if a}
    if not rerun <= set(arms):
        parser.error("--rerun takes arms that are trained now (--arms)")
    work = Path(args.work) if args.work else REPO / "runs" / "bench-distill" / f"{args.student}-{args.epochs}ep"
    spec = dataset_spec(args.dataset)
    teacher = load_teacher(args.teacher, spec.num_classes)
    options = dict(lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                   max_steps_per_epoch=args.max_steps_per_epoch)

    def train(arm: str, out: Path) -> dict:
        """One arm in its folder (resuming its checkpoints); the harness times and records it."""
        plugins = [] if arm == "alone" else [Distillation(teacher, arm)]
        run_training(arch=args.student, dataset=args.dataset, epochs=args.epochs, out_dir=out,
                     data_root=args.data_root, ema=True, plugins=plugins, **options)
        return {"threads": args.threads}

    # seconds.json is the arm's record, as before the harness, so earlier work folders still resume
    trained = Arms(work, rerun, record_file="seconds.json", time_key="train_s", log=console.print)
    for arm in arms:
        console.rule(f"[bold]{arm}")
        trained.run(arm, lambda out, arm=arm: train(arm, out))

    missing = trained.missing(all_arms)
    if missing:
        console.print(f"arms still to train: {', '.join(missing)}; run again without --arms to compare")
        return

    test = load_split(args.dataset, "test", args.data_root)
    teacher_top1 = evaluate(teacher, test)
    results = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for arm in all_arms:
        model, info = load_model(trained.folder(arm) / "model.pt")
        onnx_path = export_onnx(model, RESULTS / f"{args.student}-{arm}{suffix}.onnx", spec, test.classes,
                                {"arch": args.student, "bench": "distill", "arm": arm,
                                 "teacher": args.teacher if arm != "alone" else None, "epochs": args.epochs})
        check_onnx(model, onnx_path, test, 1000, 1e-4, args.threads)
        record = trained.record(arm)
        results[arm] = {"top1_onnxruntime": onnx_accuracy(onnx_path, test, args.threads),
                        "top1_torch": evaluate(model, test), "onnx": str(onnx_path.relative_to(REPO)),
                        "train_s": record.get("train_s"), "train_threads": record.get("threads"),
                        "train_provenance": record.get("provenance")}
    alone = results["alone"]["top1_onnxruntime"]
    for arm, r in results.items():
        r["gain_pp_over_alone"] = r["top1_onnxruntime"] - alone
    best = max(methods, key=lambda m: results[m]["gain_pp_over_alone"])
    out = {
        "teacher": args.teacher, "teacher_top1": teacher_top1, "student": args.student, "dataset": args.dataset,
        "budget": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "schedule": "onecycle",
                   "ema": True, "seed": args.seed, "from": "random init (same seed for every arm)"},
        "arms": results, "best_method": best, "best_gain_pp": results[best]["gain_pp_over_alone"],
        "distillation_helped": results[best]["gain_pp_over_alone"] > 0,
        "machine": machine_description(), "torch": torch.__version__,
    }
    atomic_write_json(RESULTS / f"distill{suffix}.json", with_provenance(out))

    table = Table(title=f"{args.student} student, teacher {args.teacher} ({teacher_top1:.2f}%), "
                        f"{args.epochs} epochs each, {out['machine']['cpu']}")
    for col in ("arm", "top-1 ORT %", "top-1 torch %", "gain pp", "train min"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, r in results.items():
        table.add_row(arm, f"{r['top1_onnxruntime']:.2f}", f"{r['top1_torch']:.2f}",
                      f"{r['gain_pp_over_alone']:+.2f}", f"{r['train_s'] / 60:.1f}" if r["train_s"] else "-")
    table.caption = (f"distillation {'helped' if out['distillation_helped'] else 'did not help'}: best {best} "
                     f"{out['best_gain_pp']:+.2f} pp; wrote bench/results/distill{suffix}.json")
    console.print(table)


if __name__ == "__main__":
    main()
