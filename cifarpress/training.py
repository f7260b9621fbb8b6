"""Train or fine-tune one model into a run folder: shared by `cifarpress train` and the recipe `train` stage."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import atomic_write_json, load_model, save_model
from .data import dataset_spec, load_split
from .errors import CifarpressError
from .models import build_model
from .plugins import WeightEMA
from .trainer import Plugin, TrainConfig, Trainer, distributed_context


def run_training(arch: str, dataset: str, epochs: int, out_dir: Path, data_root=None, init: str | None = None,
                 ema: bool = False, plugins: list[Plugin] | None = None, force: bool = False,
                 **config) -> dict | None:
    """Returns {'top1', 'model_path', 'history'} on rank 0 (None on other ranks)."""
    out_dir = Path(out_dir)
    rank, world = distributed_context()
    if force and rank == 0 and out_dir.exists():
        shutil.rmtree(out_dir)
    if world > 1:
        torch.distributed.barrier()  # no rank may look for last.pt before rank 0 has cleared it
    spec = dataset_spec(dataset)
    if init:
        model, info = load_model(init)
        arch = info["arch"]
        if info["num_classes"] != spec.num_classes:
            raise CifarpressError(
                f"{init} has {info['num_classes']} outputs but {dataset} has {spec.num_classes} classes")
    else:
        torch.manual_seed(config.get("seed", 0))
        model = build_model(arch, spec.num_classes)
    train_split = load_split(dataset, "train", data_root)
    test_split = load_split(dataset, "test", data_root)
    cfg = TrainConfig(epochs=epochs, **config)
    plugins = list(plugins or []) + ([WeightEMA()] if ema else [])
    trainer = Trainer(model, cfg, plugins, run_dir=out_dir)
    result = trainer.fit(train_split, test_split)
    if not trainer.is_main:
        return None
    command = " ".join(["cifarpress"] + sys.argv[1:]) if Path(sys.argv[0]).name == "cifarpress" else None
    meta = {"top1": result.top1, "epochs": epochs, "train_config": vars(cfg), "command": command,
            "history": result.history}
    model_path = save_model(out_dir / "model.pt", result.model, arch, spec.num_classes, dataset, meta)
    atomic_write_json(out_dir / "metrics.json", {"top1": result.top1, "arch": arch, "dataset": dataset,
                                                  "history": result.history, "command": command})
    return {"top1": result.top1, "model_path": str(model_path), "history": result.history}
