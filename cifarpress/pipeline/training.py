"""Train or fine-tune one model into a run folder: shared by `cifarpress train` and the recipe `train` stage."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.model_file import load_model, save_model
from cifarpress.models import build_model
from cifarpress.pipeline.run_folder import RunFolder, check_can_clear
from cifarpress.pipeline.recipe import TrainStage, applied_in, applied_techniques
from cifarpress.techniques import StageContext
from cifarpress.techniques.mesa.config import MesaConfig
from cifarpress.train.trainer import Plugin, TrainConfig, Trainer, distributed_context
from cifarpress.utils.io import atomic_write_json


def stage_plugins(kind: str, body, num_classes: int, entering_model: str | Path) -> list:
    """The plug-ins a training stage asks for, built through the catalogue: its own technique (if the stage
    is one) and every add-on it sets, in phase order (train.phases: reshape, quantize, loss, average, memory)."""
    context = StageContext(num_classes, str(entering_model), load_model)
    ordered = sorted(applied_in(kind, body), key=lambda item: item[0].phase)  # stable: ties keep catalogue order
    return [plugin for technique, config in ordered if (plugin := technique.build(config, context)) is not None]


def run_training(arch: str, dataset: str, epochs: int, out_dir: Path, data_root=None, init: str | None = None,
                 ema: bool = False, mesa: bool = False, plugins: list[Plugin] | None = None, force: bool = False,
                 own_folder: bool = True, applied: list[dict] | None = None, **config) -> dict | None:
    """Returns {'top1', 'model_path', 'history'} on rank 0 (None on other ranks).

    own_folder: out_dir is this run's own run folder (`cifarpress train`), locked while it trains and
    emptied first with `force`; a recipe stage passes False, as the recipe's run folder is locked already.
    applied: the techniques this training applies ({name, config}), recorded in the model file after those
    the starting model (init) recorded."""
    out_dir = Path(out_dir)
    rank, world = distributed_context()
    folder = RunFolder(out_dir, force) if own_folder and rank == 0 else contextlib.nullcontext(out_dir)
    if own_folder and force:
        check_can_clear(out_dir)  # before loading anything, on every rank: refuse early, delete nothing
    # Everything that can fail on bad input (model, data) runs before --force empties the folder.
    prepared = _prepare(arch, dataset, data_root, init, config.get("seed", 0))
    with folder:
        if world > 1:
            torch.distributed.barrier()  # no rank may look for last.pt before rank 0 has cleared it
        return _train(*prepared, dataset, epochs, out_dir, ema, mesa, plugins, config, applied or [])


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


def _train(model, arch, spec, train_split, test_split, recorded, dataset, epochs, out_dir, ema, mesa, plugins,
           config, applied):
    cfg = TrainConfig(epochs=epochs, **config)
    # `cifarpress train --ema --mesa`: the catalogue's add-ons with their defaults, as a train stage carries them
    flags = TrainStage(ema=ema, mesa=MesaConfig() if mesa else None)
    plugins = list(plugins or []) + stage_plugins("train", flags, spec.num_classes, "")
    trainer = Trainer(model, cfg, plugins, run_dir=out_dir)
    result = trainer.fit(train_split, test_split)
    if not trainer.is_main:
        return None
    command = " ".join(["cifarpress"] + sys.argv[1:]) if Path(sys.argv[0]).name == "cifarpress" else None
    meta = {"top1": result.top1, "epochs": epochs, "train_config": vars(cfg), "command": command,
            "history": result.history}
    applied = applied + applied_techniques("train", flags)
    model_path = save_model(out_dir / "model.pt", result.model, arch, spec.num_classes, dataset, meta,
                            techniques=recorded + applied)
    atomic_write_json(out_dir / "metrics.json", {"top1": result.top1, "arch": arch, "dataset": dataset,
                                                  "history": result.history, "command": command})
    return {"top1": result.top1, "model_path": str(model_path), "history": result.history}
