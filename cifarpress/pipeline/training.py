"""Train one model from files into a run folder: `cifarpress train` and a recipe's training stages.

What it adds to the API's run_stage (the one training path) is the file side: the starting model read
from a model file or built from the zoo, the CIFAR splits loaded, the run folder locked (and emptied with
`force`), and model.pt plus metrics.json written with the techniques applied recorded."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.model_file import load_model, save_model
from cifarpress.models import build_model
from cifarpress.pipeline.api import run_stage, stage_config, stage_plugins, train_config
from cifarpress.pipeline.recipe import applied_techniques
from cifarpress.pipeline.run_folder import RunFolder, check_can_clear
from cifarpress.train.options import TrainingOptions, from_scratch
from cifarpress.train.trainer import Plugin, distributed_context
from cifarpress.utils.io import atomic_write_json

__all__ = ["run_training", "stage_plugins"]


def run_training(arch: str | None, dataset: str, out_dir: Path, data_root=None, init: str | None = None,
                 kind: str = "train", body=None, teacher: str | None = None, ema: bool = False, mesa: bool = False,
                 plugins: list[Plugin] | None = None, force: bool = False, own_folder: bool = True,
                 **options) -> dict | None:
    """Returns {'top1', 'model_path', 'history'} on rank 0 (None on other ranks).

    kind, body: the stage (train, prune, quantize, distill) and its validated body; without a body, a train
    stage of `options` (from-scratch defaults, as TrainConfig's) with the ema / mesa add-ons. teacher: the
    distillation teacher's model file (default: the starting model). plugins: extra plug-ins (the bench
    scripts' arms). own_folder: out_dir is this run's own run folder (`cifarpress train`), locked while it
    trains and emptied first with `force`; a recipe stage passes False, as the recipe's run folder is locked
    already. The model file records the techniques the starting model (init) recorded, then this stage's."""
    if body is None:
        defaults = {name: from_scratch(name) for name in TrainingOptions.model_fields}
        body = stage_config("train", {**defaults, **options}, ema=ema, mesa=True if mesa else None)
    out_dir = Path(out_dir)
    rank, world = distributed_context()
    folder = RunFolder(out_dir, force) if own_folder and rank == 0 else contextlib.nullcontext(out_dir)
    if own_folder and force:
        check_can_clear(out_dir)  # before loading anything, on every rank: refuse early, delete nothing
    # Everything that can fail on bad input (model, data) runs before --force empties the folder.
    model, arch, spec, train_split, test_split, recorded = _prepare(arch, dataset, data_root, init, body.seed)
    with folder:
        if world > 1:
            torch.distributed.barrier()  # no rank may look for last.pt before rank 0 has cleared it
        result = run_stage(kind, model, train_split, body, test=test_split, teacher=teacher or init,
                           plugins=plugins or (), out=out_dir)
        if rank != 0:
            return None
        command = " ".join(["cifarpress"] + sys.argv[1:]) if Path(sys.argv[0]).name == "cifarpress" else None
        meta = {"top1": result.top1, "epochs": body.epochs, "train_config": vars(train_config(body)),
                "command": command, "history": result.history}
        model_path = save_model(out_dir / "model.pt", result.model, arch, spec.num_classes, dataset, meta,
                                techniques=recorded + applied_techniques(kind, body))
        atomic_write_json(out_dir / "metrics.json", {"top1": result.top1, "arch": arch, "dataset": dataset,
                                                      "history": result.history, "command": command})
        return {"top1": result.top1, "model_path": str(model_path), "history": result.history}


def _prepare(arch, dataset, data_root, init, seed):
    spec = dataset_spec(dataset)
    recorded = []
    if init:
        model, info = load_model(init)
        arch, recorded = info["arch"], info.get("techniques", [])
        if info["num_classes"] != spec.num_classes:
            raise CifarpressError(
                f"{init} has {info['num_classes']} outputs but {dataset} has {spec.num_classes} classes")
    else:
        torch.manual_seed(seed)
        model = build_model(arch, spec.num_classes)
    train_split = load_split(dataset, "train", data_root)
    test_split = load_split(dataset, "test", data_root)
    return model, arch, spec, train_split, test_split, recorded
