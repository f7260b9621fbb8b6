"""Our HESSO pruning vs Torch-Pruning, from the same trained checkpoint, at the same MACs and fine-tuning budget.

    pip install torch-pruning   # only this benchmark needs it
    python bench/prune_vs_torch_pruning.py --model builtin:resnet20-cifar10 --macs 0.5 --epochs 10 [--threads 2]
                                           [--arms hesso-fisher,tp-magnitude,tp-taylor] [--reuse ARM=DIR] [--keep ARM]
                                           [--rerun ARM,...]

Arms (each in its own resumable folder under --work, default
runs/bench-prune/<arch>-macs<M>-<E>ep/<arm>/):
  hesso         ours: HESSO drives whole zero-invariant groups to zero during the
                E epochs (widths kept in multiples of --channel-multiple), then the
                compact network is cut out. This arm is the first rule: groups ranked by
                one step's magnitude + Taylor score alone (`selection: score`), pruned
                between 10% and 50% of the steps.
  hesso-per-mac the same, ranked by score per MAC saved (`selection: score-per-mac`).
  hesso-uniform every unit cut by a common fraction, topped up per MAC
                (`selection: uniform`), pruned over the first 30% of the steps.
  hesso-fisher  the prune stage's defaults: squared group Taylor terms averaged over
                each period (`saliency: fisher`) per MAC saved, pruned between 5% and
                30% of the steps.
  hesso-fisher-x16  the same with widths in multiples of 16 whatever --channel-multiple
                says (onnxruntime's channel block on AVX-512 CPUs).
  hesso-fisher-rb, hesso-fisher-x16-rb  hesso-fisher and hesso-fisher-x16, free to cut a
                residual branch whole (`remove_branches`): the block becomes its shortcut
                plus a constant, whole convs go.
  hesso-fisher-x16-kd  hesso-fisher-x16, distilled from the baseline in the same pass (Hinton KD,
                the distill block's defaults). Same epochs, but each step also runs the
                teacher (about 1.3x the compute), so it is reported beside the others and
                left out of the equal-budget verdict (best_ours).
  gating-x16-rb, gating-dynamic-x16-rb  consensus gating (`method: gating`) with the
                headline's widths and branch removal: static gates, or per-sample gates pushed
                to a consensus and frozen (`gates: dynamic`).
  gating-rb, gating-dynamic-rb  the same at --channel-multiple's widths.
  gating-annealed-rb, gating-annealed-x16-rb  static gates in ChipNet's continuous Heaviside
                form (`form: annealed`, sharpness raised over the gating window) instead of
                hard 0/1 with a straight-through gradient: the issue's other gate form.
  (--reuse ARM=DIR takes a finished prune stage of the same budget as one of these,
  e.g. a `cifarpress prune` run with the same options.)
  tp-magnitude  Torch-Pruning one-shot with GroupMagnitudeImportance (L2), then E
                epochs of fine-tuning.
  tp-taylor     Torch-Pruning one-shot with GroupTaylorImportance (gradients from
                1,024 class-balanced training images), then E epochs of fine-tuning.
Torch-Pruning runs as its users run it: uniform per-layer ratio, classifier left
alone, widths unrounded; the ratio is searched so its MACs land at or under the
target. Every arm trains with the same options as a `prune:` recipe stage
(lr, cosine schedule, batch 128, weight decay 5e-4, seed 0). Arms may run in
separate processes (--arms); a run that finds every arm finished compares them.
An arm is finished once its seconds.json (wall time, threads, provenance: commit,
command, machine) is written; --rerun trains an arm again from scratch, the old
folder kept beside it as <arm>.replaced-<time> (bench/harness.py).

Comparison, in one run: top-1 through onnxruntime on the full test set, params
and MACs (cifarpress.profile), ONNX bytes, and onnxruntime latency p50 at batch 1
and 64 with the baseline and all arms timed in turn (cifarpress.runtime.latency.compare_onnx,
fixed threads, median over rounds). Writes bench/results/prune_vs_torch_pruning-<arch>.json
and keeps each method's most accurate equal-budget arm (or --headline ARM) as bench/results/<arch>-<method>.onnx
(resnet56-hesso.onnx, resnet56-gating.onnx); --no-headline keeps none.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from cifarpress.runtime.latency import compare_onnx
from cifarpress.utils.io import atomic_write_json
from cifarpress.model_file import load_model, read_checkpoint, save_model
from cifarpress.pipeline.compress import stage_plugins
from cifarpress.data import Normalizer, balanced_subset, dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import check_onnx, export_onnx
from cifarpress.profile import profile_model
from cifarpress.pipeline.recipe import stage_body
from cifarpress.techniques.distill.config import DistillConfig
from cifarpress.pipeline.training import run_training
from harness import Arms, with_provenance  # bench/harness.py: a script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# our arms: the prune-stage options each one overrides (the rest are the stage defaults)
OUR_ARMS = {
    "hesso": {"selection": "score", "saliency": "magnitude-taylor", "start_fraction": 0.1, "end_fraction": 0.5},
    "hesso-per-mac": {"selection": "score-per-mac", "saliency": "magnitude-taylor", "start_fraction": 0.1,
                      "end_fraction": 0.5},
    "hesso-uniform": {"selection": "uniform", "saliency": "magnitude-taylor", "start_fraction": 0.0,
                      "end_fraction": 0.3},
    "hesso-fisher": {"selection": "score-per-mac", "saliency": "fisher", "start_fraction": 0.05,
                     "end_fraction": 0.3},  # the prune stage's defaults
}
# the same with widths in multiples of 16, onnxruntime's channel block on AVX-512 CPUs (bench/width_rounding.py)
OUR_ARMS["hesso-fisher-x16"] = {**OUR_ARMS["hesso-fisher"], "channel_multiple": 16}
# ... and free to cut a residual branch whole (the block keeps its shortcut): whole convs go, not just widths
OUR_ARMS["hesso-fisher-rb"] = {**OUR_ARMS["hesso-fisher"], "remove_branches": True}
OUR_ARMS["hesso-fisher-x16-rb"] = {**OUR_ARMS["hesso-fisher-x16"], "remove_branches": True}
# ... and distilled from the baseline while it prunes: more compute per step than the equal-budget arms
OUR_ARMS["hesso-fisher-x16-kd"] = {**OUR_ARMS["hesso-fisher-x16"], "distill": DistillConfig(method="kd")}
# consensus gating (prune: {method: gating}) at the headline arm's rounding and branch removal: one static
# logit per group, or per-sample heads pushed to agree (the two variants)
OUR_ARMS["gating-x16-rb"] = {"method": "gating", "channel_multiple": 16, "remove_branches": True}
OUR_ARMS["gating-dynamic-x16-rb"] = {**OUR_ARMS["gating-x16-rb"], "gates": "dynamic"}
# ... and at --channel-multiple's rounding (ResNet-20, whose 16-wide first stage a multiple of 16 cannot thin)
OUR_ARMS["gating-rb"] = {"method": "gating", "remove_branches": True}
OUR_ARMS["gating-dynamic-rb"] = {**OUR_ARMS["gating-rb"], "gates": "dynamic"}
# ... and with ChipNet's annealed continuous Heaviside in place of hard gates: which form is the default is measured
OUR_ARMS["gating-annealed-rb"] = {**OUR_ARMS["gating-rb"], "form": "annealed"}
OUR_ARMS["gating-annealed-x16-rb"] = {**OUR_ARMS["gating-x16-rb"], "form": "annealed"}
ARMS = (*OUR_ARMS, "tp-magnitude", "tp-taylor")
BUDGET_KEYS = ("epochs", "lr", "schedule", "batch_size", "weight_decay", "warmup_fraction")


def import_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise SystemExit("this benchmark compares against Torch-Pruning: pip install torch-pruning") from None
    return torch_pruning


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def add_taylor_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize) -> None:
    """Accumulate loss gradients on a fixed image set: Taylor importance scores weights by weight x gradient."""
    model.eval()  # BN running stats stay those of the trained model
    model.zero_grad()
    for start in range(0, len(images), 128):
        x = normalize(images[start:start + 128])
        nn.functional.cross_entropy(model(x), labels[start:start + 128]).backward()


def torch_pruning_prune(baseline: nn.Module, importance: str, macs_fraction: float, num_classes: int,
                        grad_images, grad_labels, normalize) -> tuple[nn.Module, dict]:
    """One-shot Torch-Pruning at the largest uniform ratio whose MACs are <= the target fraction."""
    tp = import_torch_pruning()
    example = torch.randn(1, 3, 32, 32)
    base_macs = profile_model(baseline).macs

    def prune_at(ratio: float) -> tuple[nn.Module, int]:
        model = copy.deepcopy(baseline)
        if importance == "taylor":
            add_taylor_gradients(model, grad_images, grad_labels, normalize)
            scorer = tp.importance.GroupTaylorImportance()
        else:
            scorer = tp.importance.GroupMagnitudeImportance(p=2)
        pruner = tp.pruner.BasePruner(model, example, importance=scorer, pruning_ratio=ratio,
                                      ignored_layers=classifier_layers(model, num_classes))
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model, profile_model(model).macs

    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):  # bisection on the ratio; MACs fall monotonically as it grows
        mid = (lo + hi) / 2
        model, macs = prune_at(mid)
        if macs <= macs_fraction * base_macs:
            hi, best = mid, (model, macs, mid)
        else:
            lo = mid
    if best is None:
        raise CifarpressError(f"Torch-Pruning could not reach {macs_fraction:g} of the MACs")
    model, macs, ratio = best
    return model, {"pruning_ratio": ratio, "macs_fraction": macs / base_macs, "importance": importance,
                   "torch_pruning": tp.__version__}


def method_of(arm: str) -> str:
    """Our arm's prune method (hesso unless it says otherwise): names its headline file."""
    return OUR_ARMS[arm].get("method", "hesso")


def distilled(arm: str) -> bool:
    """Our arm trains with a teacher (extra compute per step, so outside the equal-budget verdict)."""
    return "distill" in OUR_ARMS[arm]


def arm_options(arm: str) -> dict:
    """OUR_ARMS[arm] as JSON: the distill block written out with its fields."""
    return {k: v.model_dump(exclude_unset=True) if isinstance(v, DistillConfig) else v
            for k, v in OUR_ARMS[arm].items()}


def budget_of(stage) -> dict:
    options = stage.training_options()
    return {k: options[k] for k in BUDGET_KEYS if k in options}


def check_reused_run(arm: str, run: Path, budget: dict) -> Path:
    model_path = run / "model.pt"
    if not model_path.is_file():
        raise SystemExit(f"reused run {run} has no model.pt; point it at a finished prune stage folder")
    meta = read_checkpoint(model_path).get("meta", {})
    used = {**meta.get("train_config", {}), "epochs": meta.get("epochs")}
    differs = {k: (used.get(k), v) for k, v in budget.items() if used.get(k) != v}
    if differs:
        raise SystemExit(f"reused run {run} was trained with a different budget (run, asked): {differs}")
    # the distillation plug-in leaves its teacher timing in every epoch's metrics
    was_distilled = any("teacher_s" in epoch for epoch in meta.get("history") or [])
    if was_distilled != distilled(arm):
        said = {True: "distilled", False: "not distilled"}
        raise SystemExit(f"reused run {run} is {said[was_distilled]} but arm {arm} is {said[distilled(arm)]}; "
                         f"reuse it as an arm that matches")
    return model_path


def train_arm(arm: str, args, stage, baseline_path: str, out: Path, console: Console) -> dict:
    """Train one arm in its folder `out` (resuming its checkpoints); the harness times and records it."""
    options = stage.training_options()
    if arm in OUR_ARMS:
        common = stage.model_dump(include={"macs", "channel_multiple", *BUDGET_KEYS, "max_steps_per_epoch"})
        arm_stage = stage_body("prune", **{**common, "method": "hesso", **OUR_ARMS[arm]})
        plugins = stage_plugins("prune", arm_stage, dataset_spec(args.dataset).num_classes, baseline_path)
        run_training(arch=None, dataset=args.dataset, out_dir=out, data_root=args.data_root,
                     init=baseline_path, plugins=plugins, **options)
    else:
        pruned_path = out / "pruned-before-finetune.pt"
        if not pruned_path.exists():
            baseline, info = load_model(baseline_path)
            spec = dataset_spec(args.dataset)
            train = load_split(args.dataset, "train", args.data_root)
            idx = balanced_subset(train.labels, 1024, seed=0)
            pruned, how = torch_pruning_prune(baseline, arm.split("-", 1)[1], stage.macs, spec.num_classes,
                                              train.images[idx], train.labels[idx],
                                              Normalizer(spec.mean, spec.std))
            console.print(f"{arm}: ratio {how['pruning_ratio']:.4f} keeps {how['macs_fraction']:.3f} of the MACs")
            save_model(pruned_path, pruned, info["arch"], info["num_classes"], info["dataset"], {"torch_pruning": how})
        run_training(arch=None, dataset=args.dataset, out_dir=out, data_root=args.data_root,
                     init=str(pruned_path), **options)
    return {"threads": args.threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:resnet20-cifar10", help="trained baseline checkpoint")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--macs", type=float, default=0.5, help="fraction of MACs kept")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--channel-multiple", type=int, default=8)
    parser.add_argument("--arms", default="hesso-fisher,tp-magnitude,tp-taylor",
                        help="arms to compare (and train, if unfinished)")
    parser.add_argument("--only", default=None, help="train only these arms now, compare later")
    parser.add_argument("--train-only", action="store_true", help="train the unfinished arms, do not compare yet")
    parser.add_argument("--rerun", default="", metavar="ARM,...",
                        help="train these arms again from scratch even if finished (the old folder is kept "
                             "as <arm>.replaced-<time>)")
    parser.add_argument("--reuse", action="append", default=[], metavar="ARM=DIR",
                        help="finished prune stage folder (same budget) to use as one of our arms; repeatable")
    parser.add_argument("--keep", action="append", default=[], metavar="ARM",
                        help="also keep this arm's ONNX as bench/results/<arch>-<arm>.onnx; repeatable")
    parser.add_argument("--headline", action="append", default=[], metavar="ARM",
                        help="our arm kept as bench/results/<arch>-<method>.onnx (hesso or gating; default: "
                             "each method's most accurate equal-budget arm); one per method, repeatable")
    parser.add_argument("--no-headline", action="store_true",
                        help="keep no headline file (a side comparison that must not replace the shipped ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per batch size and round")
    parser.add_argument("--work", default=None)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="smoke tests only")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/prune_vs_torch_pruning-<arch>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)

    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    ours_listed = set(arms) & set(OUR_ARMS)
    if not set(args.keep) <= ours_listed:
        parser.error("--keep takes one of our arms that --arms lists")
    if not set(args.headline) <= ours_listed:
        parser.error("--headline takes one of our arms that --arms lists")
    if len({method_of(a) for a in args.headline}) < len(args.headline):
        parser.error("--headline takes one arm per method (hesso, gating)")
    if any(a.startswith("tp-") for a in arms):
        import_torch_pruning()
    stage = stage_body("prune", method="hesso", macs=args.macs, epochs=args.epochs, lr=args.lr,
                       channel_multiple=args.channel_multiple, max_steps_per_epoch=args.max_steps_per_epoch)
    baseline, info = load_model(args.model)
    arch = info["arch"]
    work = Path(args.work) if args.work else REPO / "runs" / "bench-prune" / f"{arch}-macs{args.macs:g}-{args.epochs}ep"
    budget = budget_of(stage)

    reused = dict(item.split("=", 1) for item in args.reuse if "=" in item)
    if len(reused) != len(args.reuse) or not set(reused) <= set(OUR_ARMS):
        parser.error(f"--reuse takes ARM=DIR with ARM one of {list(OUR_ARMS)}")
    rerun = {a for a in args.rerun.split(",") if a}
    if not rerun <= set(arms) - set(reused):
        parser.error("--rerun takes arms that --arms lists and --reuse does not")
    # seconds.json is the arm's record, as before the harness, so earlier work folders still resume
    trained = Arms(work, rerun, record_file="seconds.json", time_key="train_s", log=console.print)
    model_files = {}
    for arm in arms:
        if arm in reused:
            model_files[arm] = check_reused_run(arm, Path(reused[arm]), budget)
            continue
        if args.only is None or arm in args.only.split(","):
            console.rule(f"[bold]{arm}")
            trained.run(arm, lambda out, arm=arm: train_arm(arm, args, stage, args.model, out, console))
        model_files[arm] = trained.folder(arm) / "model.pt"
    missing = [a for a in arms if a not in reused and not trained.done(a)]
    if missing or args.train_only:
        console.print(f"arms still to train: {', '.join(missing) or 'none'}; run again (without --train-only) to compare")
        return

    spec = dataset_spec(args.dataset)
    test = load_split(args.dataset, "test", args.data_root)
    onnx_dir = work / "onnx"
    models = {"baseline": baseline} | {arm: load_model(p)[0] for arm, p in model_files.items()}
    files = {}
    for name, model in models.items():
        files[name] = export_onnx(model, onnx_dir / f"{name}.onnx", spec, test.classes,
                                  {"arch": arch, "bench": "prune_vs_torch_pruning", "arm": name})
        check_onnx(model, files[name], test, 1000, 1e-4, args.threads)
    console.print("measuring accuracy, and latency with the baseline and the arms timed in turn ...")
    compared = compare_onnx(list(files.values()), (1, 64), args.threads, test, args.seconds, args.rounds)
    results = {}
    for (name, model), row in zip(models.items(), compared["models"]):
        prof = profile_model(model)
        # a reused folder may be an earlier bench arm's, with its own record
        record = (trained.record(name, model_files[name].parent) if name in model_files else None) or {}
        results[name] = {"top1_onnxruntime": row["top1"], "params": prof.params, "macs": prof.macs,
                         "onnx_bytes": row["onnx_bytes"], "latency_ms_p50": row["latency_ms_p50"],
                         "latency_vs_baseline": row["latency_vs_first"], "top1_delta_pp": row["top1_delta_pp"],
                         "train_s": record.get("train_s"), "train_threads": record.get("threads"),
                         "train_provenance": record.get("provenance")}
    for r in results.values():
        r["macs_vs_baseline"] = r["macs"] / results["baseline"]["macs"]
    def most_accurate(candidates: list[str]) -> str | None:
        return max(candidates, key=lambda a: results[a]["top1_onnxruntime"]) if candidates else None

    best_tp = most_accurate([a for a in arms if a.startswith("tp-")])
    our_arms = [a for a in arms if a in OUR_ARMS and not distilled(a)]  # equal budget only
    best_ours = most_accurate(our_arms)
    best_by_method = {method: most_accurate([a for a in our_arms if method_of(a) == method])
                      for method in dict.fromkeys(method_of(a) for a in our_arms)}

    RESULTS.mkdir(parents=True, exist_ok=True)
    # one headline file per method: the shipped HESSO and gating models are compared, neither replaces the other
    headlines = {} if args.no_headline or args.max_steps_per_epoch is not None else {
        method: next((a for a in args.headline if method_of(a) == method), best)
        for method, best in best_by_method.items()}
    kept = {}
    for method, arm in headlines.items():
        kept[arm] = RESULTS / f"{arch}-{method}.onnx"
        kept[arm].write_bytes(files[arm].read_bytes())
    also_kept = {}
    for arm in args.keep if args.max_steps_per_epoch is None else ():
        also_kept[arm] = RESULTS / f"{arch}-{arm}.onnx"
        also_kept[arm].write_bytes(files[arm].read_bytes())
    out = {
        "baseline_checkpoint": args.model, "arch": arch, "dataset": args.dataset, "macs_target": args.macs,
        "budget": {**budget, "from": args.model, "channel_multiple_hesso": args.channel_multiple,
                   "max_steps_per_epoch": args.max_steps_per_epoch},
        "reused_runs": reused, "our_arm_options": {a: arm_options(a) for a in arms if a in OUR_ARMS},
        "arms": results, "test_images": len(test), "threads": args.threads,
        "latency_rounds": {name: row["latency_rounds"] for name, row in zip(files, compared["models"])},
        "latency_seconds": args.seconds,
        "best_ours": best_ours, "best_torch_pruning": best_tp, "best_by_method": best_by_method,
        "gating_minus_hesso_pp":
            results[best_by_method["gating"]]["top1_onnxruntime"] - results[best_by_method["hesso"]]["top1_onnxruntime"]
            if {"gating", "hesso"} <= set(best_by_method) else None,
        "ours_minus_torch_pruning_pp":
            results[best_ours]["top1_onnxruntime"] - results[best_tp]["top1_onnxruntime"]
            if best_tp and best_ours else None,
        "kept_onnx": {arm: str(path.relative_to(REPO)) for arm, path in kept.items()},
        "also_kept_onnx": {arm: str(path.relative_to(REPO)) for arm, path in also_kept.items()},
        "machine": compared["machine"], "torch": torch.__version__, "onnxruntime": compared["onnxruntime"],
    }
    out_path = Path(args.out) if args.out else RESULTS / f"prune_vs_torch_pruning-{arch}.json"
    atomic_write_json(out_path, with_provenance(out))

    table = Table(title=f"{arch} pruned to {args.macs:g} of MACs, {args.epochs} epochs each, {args.threads} threads, "
                        f"{out['machine']['cpu']}")
    for col in ("arm", "top-1 %", "Δ pp", "params", "MACs ×", "ONNX MB", "b1 ms", "b64 ms", "b1 ×", "b64 ×",
                "train min"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, r in results.items():
        lat, ratio = r["latency_ms_p50"], r["latency_vs_baseline"]
        table.add_row(name, f"{r['top1_onnxruntime']:.2f}", f"{r['top1_delta_pp']:+.2f}", f"{r['params']:,}",
                      f"{r['macs_vs_baseline']:.3f}", f"{r['onnx_bytes'] / 1e6:.2f}", f"{lat['1']:.3f}",
                      f"{lat['64']:.2f}", f"{ratio['1']:.2f}", f"{ratio['64']:.2f}",
                      f"{r['train_s'] / 60:.1f}" if r["train_s"] else "-")
    table.caption = f"wrote {out_path}" + "".join(f" and {path}" for path in kept.values())
    console.print(table)


if __name__ == "__main__":
    main()
