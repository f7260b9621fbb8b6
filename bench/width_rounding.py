"""Which `channel_multiple` makes a pruned network fast on this CPU: latency of the widths a prune would keep.

    python bench/width_rounding.py --model builtin:resnet56-cifar10 --macs 0.5 --multiples 8,16 [--threads 1]
        [--remove-branches]

Latency depends only on the widths, not on trained weights, so no training is needed to
compare roundings. For each multiple, the prune stage's selection (`--selection`,
default score-per-mac) picks the groups to cut at the MACs target, ranked by the
baseline's Fisher saliency (squared group Taylor terms averaged over `--batches`
training batches, the statistic HESSO's first period uses). The compact network is cut
out and exported, and every file is timed side by side with the baseline in onnxruntime
(interleaved rounds, fixed threads). With --remove-branches, each multiple is also cut with
the prune stage's `remove_branches: true` (residual branches may go whole). Writes
bench/results/width_rounding-<arch>.json.

Why it matters: onnxruntime's fast CPU convolutions run in a blocked channel layout (NCHWc)
whose block is 16 channels with AVX-512 and 8 with AVX2; a width that is not a multiple of
the block falls off that path or is padded up to it, with layout reorders around it (they
show in onnxruntime's profile), so the MACs saved there buy less time.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cifarpress.runtime.latency import interleaved_latency, machine_description
from cifarpress.utils.io import atomic_write_json
from cifarpress.model_file import load_model, resolve_checkpoint
from cifarpress.data import BatchLoader, dataset_spec, load_split
from cifarpress.export.onnx import export_onnx
from cifarpress.models.layers import ConstantChannels
from cifarpress.profile import profile_model
from cifarpress.channels.groups import discover_groups
from cifarpress.techniques.prune.pruner import GroupParams, group_taylor, saliency
from cifarpress.channels.surgery import compact_model
from cifarpress.channels.budget import SELECTIONS, PruneBudget, PruneTarget
from harness import with_provenance  # bench/harness.py: a script's own folder is on sys.path

RESULTS = Path(__file__).parent / "results"


def baseline_fisher(model, groupset, split, batches: int, batch_size: int = 128) -> torch.Tensor:
    """Mean over `batches` training batches of each group's squared Taylor term (HESSO's fisher saliency)."""
    rows = GroupParams(model, groupset)
    model.train()
    total, seen = torch.zeros(len(groupset)), 0
    for images, labels in BatchLoader(split, batch_size, train=True, seed=0):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        total += group_taylor(rows).square()
        seen += 1
        if seen == batches:
            break
    model.zero_grad(set_to_none=True)
    model.eval()
    return total / seen


def conv_widths(model) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:resnet56-cifar10", help="trained baseline checkpoint")
    parser.add_argument("--macs", type=float, default=0.5, help="fraction of MACs kept")
    parser.add_argument("--multiples", default="8,16", help="channel_multiple values to compare")
    parser.add_argument("--selection", default="score-per-mac", choices=SELECTIONS)
    parser.add_argument("--remove-branches", action="store_true",
                        help="also time each multiple with whole residual branches allowed to go")
    parser.add_argument("--batches", type=int, default=60, help="training batches for the Fisher saliency")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    multiples = [int(m) for m in args.multiples.split(",")]

    model, info = load_model(resolve_checkpoint(args.model))
    spec = dataset_spec(info["dataset"] or "cifar10")
    classes = [str(i) for i in range(info["num_classes"])]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    groupset = discover_groups(model, x)
    fisher = baseline_fisher(model, groupset, load_split(spec.name, "train", args.data_root), args.batches)
    score = saliency(GroupParams(model, groupset), fisher)
    full = profile_model(model, example_input=x)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"baseline": export_onnx(model, Path(tmp) / "baseline.onnx", spec, classes)}
        variants = [(m, False) for m in multiples] + [(m, True) for m in multiples if args.remove_branches]
        for multiple, remove in variants:
            target = PruneTarget(macs=args.macs, channel_multiple=multiple, selection=args.selection,
                                 remove_branches=remove)
            budget = PruneBudget(model, groupset, target, x)
            cut = budget.select(score, set())
            zeroed = copy.deepcopy(model)
            groupset.zero_groups(zeroed, cut)
            compact = compact_model(zeroed, groupset, group_ids=cut, check_input=x)
            prof = profile_model(compact, example_input=x)
            name = f"multiple-{multiple}" + ("-remove-branches" if remove else "")
            files[name] = export_onnx(compact, Path(tmp) / f"{name}.onnx", spec, classes)
            rows.append({"name": name, "channel_multiple": multiple, "remove_branches": remove,
                         "branches_removed": sum(isinstance(m, ConstantChannels) for m in compact.modules()),
                         "macs": prof.macs, "params": prof.params,
                         "macs_vs_baseline": prof.macs / full.macs, "params_vs_baseline": prof.params / full.params,
                         "conv_widths": conv_widths(compact)})
        latency = interleaved_latency(files, (1, 64), args.threads, args.seconds, args.rounds)

    base = latency["p50"]["baseline"]
    for row in rows:
        row["latency_ms_p50"] = latency["p50"][row["name"]]
        row["latency_vs_baseline"] = {b: row["latency_ms_p50"][b] / base[b] for b in base}
    result = {"model": args.model, "macs_target": args.macs, "selection": args.selection,
              "fisher_batches": args.batches, "baseline_latency_ms_p50": base, "roundings": rows,
              "baseline_conv_widths": conv_widths(model), "threads": args.threads, "rounds": args.rounds,
              "onnxruntime": latency["onnxruntime"], "machine": machine_description()}
    out = Path(args.out) if args.out else RESULTS / f"width_rounding-{info['arch']}.json"
    atomic_write_json(out, with_provenance(result))

    table = Table(title=f"{info['arch']} at {args.macs:g} MACs: latency by width rounding ({args.threads} thread)")
    for col in ("channel_multiple", "branches removed", "MACs", "params", "b1 latency", "b64 latency"):
        table.add_column(col, justify="right")
    for row in rows:
        lat = row["latency_vs_baseline"]
        table.add_row(str(row["channel_multiple"]), str(row["branches_removed"]), f"{row['macs_vs_baseline']:.3f}x",
                      f"{row['params_vs_baseline']:.2f}x", f"{lat['1']:.2f}x", f"{lat['64']:.2f}x")
    Console().print(table)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
