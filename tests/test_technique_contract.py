"""The contract every catalogued technique keeps (cifarpress.techniques.CATALOGUE), checked through the
same path a recipe takes (pipeline.compress.stage_plugins, model_file, pipeline export):

- it composes with distillation and the weight EMA in one pass, its plug-ins in phase order;
- a run interrupted after an epoch resumes to bit-identical weights;
- save then load gives identical logits (the model file replays what was applied);
- its export passes the onnxruntime parity check.

A new technique needs only a CASES entry (a small stage body); the first test fails until it has one.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cifarpress.data import Normalizer, dataset_spec, load_split
from cifarpress.model_file import load_model, save_model
from cifarpress.models import build_model
from cifarpress.pipeline.compress import applied_techniques, export_checked, stage_plugins
from cifarpress.pipeline.recipe import STAGE_CLASSES, TrainStage, stage_body
from cifarpress.techniques import CATALOGUE
from cifarpress.train.trainer import Plugin, TrainConfig, Trainer

SPEC = dataset_spec("cifar10")
WINDOW = {"start_fraction": 0.0, "end_fraction": 1.0}  # prune within these few steps
# One stage body per (stage technique, method); add-ons ride along in every case.
CASES = {
    "prune/hesso": ("prune", {"method": "hesso", "sparsity": 0.5, "pruning_periods": 2, **WINDOW}),
    "prune/dhspg": ("prune", {"method": "dhspg", "sparsity": 0.5, "penalty": 1.0, **WINDOW}),
    "prune/gating": ("prune", {"method": "gating", "macs": 0.6, "remove_branches": True, "gates": "dynamic",
                               "start_fraction": 0.0, "end_fraction": 0.5}),
    "quantize/ternary": ("quantize", {"method": "ternary"}),
    "quantize/adapt": ("quantize", {"method": "adapt", "min_lookback": 2, "max_lookback": 3}),
    "quantize/adapt-deploy": ("quantize", {"method": "adapt", "mode": "deploy", "min_lookback": 2,
                                           "max_lookback": 3}),
    "train": ("train", {}),  # the add-ons alone
}
# In phase order, as their plug-ins run.
ADDONS = {"distill": {"method": "kd"}, "ema": True, "mesa": {"bits": 8, "group_size": 256}}
BUDGET = {"epochs": 2, "max_steps_per_epoch": 3, "batch_size": 20, "lr": 0.05}


def test_every_catalogued_technique_has_a_case():
    wanted = {f"{kind}/{method}" for kind, classes in STAGE_CLASSES.items() for method in classes}
    assert wanted <= set(CASES), f"add a CASES entry for {sorted(wanted - set(CASES))}"
    assert {t.name for t in CATALOGUE if t.kind == "addon"} == set(ADDONS)


class Interrupt(Plugin):
    """Stops the run at the first step after `after_epoch` epochs (last.pt of that epoch is on disk)."""

    name = "interrupt"

    def __init__(self, after_epoch: int | None):
        self.after_epoch = after_epoch

    def before_step(self, trainer, images, labels):
        if self.after_epoch is not None and trainer.epoch == self.after_epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def data(tiny_cifar_root):
    return (load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False),
            load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False))


@pytest.fixture(scope="module")
def entering(tmp_path_factory):
    """The model entering the stage, which is also the default distillation teacher."""
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("entering") / "model.pt", build_model("resnet20", 10), "resnet20",
                      10, "cifar10")


def body_of(kind: str, fields: dict):
    values = {**fields, **ADDONS, **BUDGET}
    return TrainStage(**values) if kind == "train" else stage_body(kind, **values)


def train(kind, body, entering: Path, run_dir: Path, data, interrupt_after: int | None = None):
    plugins = stage_plugins(kind, body, SPEC.num_classes, entering)
    model, _ = load_model(entering)
    config = TrainConfig(**body.training_options(), eval_batch_size=100)
    trainer = Trainer(model, config, plugins + [Interrupt(interrupt_after)], run_dir=run_dir,
                      device=torch.device("cpu"), quiet=True)
    return plugins, trainer.fit(data[0], None)


@pytest.mark.parametrize("case", CASES)
def test_technique_contract(case, data, entering, tmp_path):
    kind, fields = CASES[case]
    body = body_of(kind, fields)

    # composes with KD and EMA in one pass, in phase order
    plugins, result = train(kind, body, entering, tmp_path / "straight", data)
    names = [p.name for p in plugins]
    assert names[-len(ADDONS):] == list(ADDONS) and len(names) == len(ADDONS) + (kind != "train")
    assert [p.phase for p in plugins] == sorted(p.phase for p in plugins)
    if kind == "prune" and (plugins[0].pruned_ids or case == "prune/hesso"):
        # finalize runs in reverse phase order: the EMA's averaged copy is the one cut
        entering_params = sum(p.numel() for p in load_model(entering)[0].parameters())
        assert sum(p.numel() for p in result.model.parameters()) < entering_params

    # interrupted after epoch 1, resumed: the same weights bit for bit
    with pytest.raises(KeyboardInterrupt):
        train(kind, body, entering, tmp_path / "resumed", data, interrupt_after=1)
    _, resumed = train(kind, body, entering, tmp_path / "resumed", data)
    assert resumed.resumed_from == 1
    straight, again = result.model.state_dict(), resumed.model.state_dict()
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight), case

    # save then load: identical logits; the file records what was applied
    path = save_model(tmp_path / "model.pt", result.model, "resnet20", 10, "cifar10",
                      techniques=applied_techniques(kind, body))
    loaded, info = load_model(path)
    assert [t["name"] for t in info["techniques"]] == ([] if kind == "train" else [kind]) + list(ADDONS)
    images = Normalizer(SPEC.mean, SPEC.std)(data[1].images[:50])
    with torch.no_grad():
        assert torch.equal(result.model.eval()(images), loaded.eval()(images))

    # the export the pipeline writes for it passes its parity check
    ctx = SimpleNamespace(split=lambda name: data[1], spec=SPEC,
                          recipe=SimpleNamespace(bench=SimpleNamespace(threads=1), dataset="cifar10"))
    onnx_path, checked = export_checked(ctx, loaded, tmp_path, {"arch": "resnet20"}, images=50)
    assert onnx_path.is_file() and checked["onnx_check"]["images"] == 50
