"""prune and quantize stages inside `compress`: they compose in one recipe, and bad settings get one line."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cifarpress.model_file import load_model, save_model
from cifarpress.pipeline.compress import run_recipe
from cifarpress.errors import CifarpressError, RecipeError

REPO = Path(__file__).resolve().parents[1]
from cifarpress.models import build_model
from cifarpress.pipeline.recipe import load_recipe

BENCH = "bench: {batch_sizes: [1, 4], seconds: 0.05, threads: 1}"


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base.pt"
    save_model(path, build_model("resnet20"), "resnet20", 10, "cifar10")
    return path


def write_recipe(tmp_path, checkpoint, stages: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nmodel: {{arch: resnet20, checkpoint: {checkpoint}}}\nstages:\n"
                    + textwrap.indent(textwrap.dedent(stages).strip(), "  ") + f"\n{BENCH}\n")
    return path


def test_prune_then_ternary_in_one_recipe(tmp_path, tiny_cifar_root, base_checkpoint):
    recipe = load_recipe(write_recipe(tmp_path, base_checkpoint, """
        - prune: {sparsity: 0.5, epochs: 4, max_steps_per_epoch: 5, pruning_periods: 2, batch_size: 32, lr: 0.05}
        - quantize: {epochs: 1, max_steps_per_epoch: 2, batch_size: 32, scale: absmedian}
        - export
    """))
    run_dir = run_recipe(recipe, tmp_path / "run", str(tiny_cifar_root))
    report = json.loads((run_dir / "report.json").read_text())
    base, pruned, ternary = report["stages"]
    assert [r["stage"] for r in report["stages"]] == ["baseline", "prune", "quantize"]
    # pruning cut channels physically: fewer params and MACs, a smaller ONNX graph
    assert pruned["params"] < 0.6 * base["params"] and pruned["macs"] < base["macs"]
    assert pruned["onnx_bytes"] < base["onnx_bytes"]
    # ternary keeps the pruned shape, and its packed artifact is far smaller than the fp32 ONNX
    assert ternary["params"] == pruned["params"]
    assert ternary["packed_bytes"] < base["onnx_bytes"] / 10
    precisions = {layer["name"]: layer["precision"] for layer in ternary["layers"]}
    assert precisions["conv1"] == precisions["fc"] == "int8"
    assert list(precisions.values()).count("ternary") == len(precisions) - 2
    # the stage's model file reloads as the pruned, quantized network
    model, info = load_model(run_dir / "02-quantize" / "model.pt")
    assert info["quantization"]["config"]["scale"] == "absmedian"
    assert sum(p.numel() for p in model.parameters()) == ternary["params"]
    assert "ternary" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("stage, field", [
    ("- prune: {sparsity: 0.5, macs: 0.5}", "stages[0].prune"),
    ("- prune: {epochs: 2}", "stages[0].prune"),
    ("- prune: {sparsity: 1.5}", "stages[0].prune.sparsity"),
    ("- prune: {sparsity: 0.5, method: l1}", "stages[0].prune.method"),
    ("- quantize: {act_bits: 4}", "stages[0].quantize.act_bits"),
    ("- quantize: {scale: mean}", "stages[0].quantize.scale"),
])
def test_bad_stage_settings_name_the_field(tmp_path, base_checkpoint, stage, field):
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, base_checkpoint, stage))
    assert f": {field}: " in str(info.value)
    assert "\n" not in str(info.value)


def test_keep_list_with_unknown_layer_is_one_line(tmp_path, tiny_cifar_root, base_checkpoint):
    recipe = write_recipe(tmp_path, base_checkpoint, "- quantize: {keep: [conv1, no_such_layer], epochs: 1}")
    proc = subprocess.run([sys.executable, "-m", "cifarpress.cli", "compress", str(recipe), "--out",
                           str(tmp_path / "run"), "--data-root", str(tiny_cifar_root), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_such_layer" in errors[0]
    assert "Traceback" not in proc.stderr


def test_distill_block_in_prune_and_a_distill_stage(tmp_path, tiny_cifar_root, base_checkpoint):
    recipe = load_recipe(write_recipe(tmp_path, base_checkpoint, """
        - prune: {sparsity: 0.3, epochs: 2, max_steps_per_epoch: 5, pruning_periods: 1, batch_size: 32,
                  distill: {method: dkd}}
        - distill: {arch: resnet20, epochs: 1, max_steps_per_epoch: 2, batch_size: 32, distill: {method: nkd}}
        - export
    """))
    run_dir = run_recipe(recipe, tmp_path / "run", str(tiny_cifar_root))
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["baseline", "prune", "distill"]
    pruned, student = report["stages"][1:]
    assert pruned["params"] < report["stages"][0]["params"]
    # the distill stage trained a fresh full-width resnet20 student from the pruned teacher
    assert student["params"] == report["stages"][0]["params"]
    # the prune stage trained with the distillation term: its teacher cost was measured every epoch
    prune_history = torch.load(run_dir / "01-prune" / "model.pt", weights_only=True)["meta"]["history"]
    assert all("teacher_time_fraction" in epoch for epoch in prune_history)


@pytest.mark.parametrize("block, needle", [
    ("distill: {teacher: missing.pt}", "stages[0].train.distill.teacher: file"),
    ("distill: {method: kd, alpha: 2}", "stages[0].train.distill: alpha applies only to method dkd"),
    ("distill: {teacher: builtin:nope}", "no built-in checkpoint 'nope'"),
])
def test_bad_distill_settings_name_the_field(tmp_path, base_checkpoint, block, needle):
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, base_checkpoint, f"- train: {{{block}}}"))
    assert needle in str(info.value)


def test_teacher_with_other_class_count_is_one_clear_error(tmp_path, tiny_cifar_root, base_checkpoint):
    teacher = tmp_path / "teacher100.pt"
    save_model(teacher, build_model("resnet20", 100), "resnet20", 100, "cifar100")
    recipe = load_recipe(write_recipe(tmp_path, base_checkpoint,
                                      f"- train: {{epochs: 1, max_steps_per_epoch: 1, distill: {{teacher: {teacher}}}}}"))
    with pytest.raises(CifarpressError, match="100 outputs"):
        run_recipe(recipe, tmp_path / "run", str(tiny_cifar_root))


def run_shipped_prune_recipe(name: str, run: Path, data_root, **budget) -> list[dict]:
    """recipes/NAME as shipped, its prune stage on `budget`, on tiny data; checks the stage halved the MACs
    and returns the pruned model's training history."""
    import yaml

    from cifarpress.pipeline.recipe import recipe_from_dict

    path = REPO / "recipes" / name
    raw = yaml.safe_load(path.read_text())
    prune = raw["stages"][0]["prune"]
    prune.update(**({"pruning_periods": 1} if prune.get("method", "hesso") == "hesso" else {}), **budget)
    raw["bench"] = {"batch_sizes": [1], "seconds": 0.05}
    run_dir = run_recipe(recipe_from_dict(raw, path.parent, path), run, str(data_root))
    baseline, pruned = json.loads((run_dir / "report.json").read_text())["stages"]
    assert pruned["stage"] == "prune" and pruned["macs"] <= 0.55 * baseline["macs"]
    return torch.load(run_dir / "01-prune" / "model.pt", weights_only=True)["meta"]["history"]


def test_shipped_prune_distill_recipe_runs_end_to_end(tmp_path, tiny_cifar_root):
    """recipes/resnet20-prune-distill.yaml as shipped (both built-in checkpoints), on tiny data with a tiny budget."""
    history = run_shipped_prune_recipe("resnet20-prune-distill.yaml", tmp_path / "run", tiny_cifar_root,
                                       epochs=2, max_steps_per_epoch=3, batch_size=32)
    assert all("teacher_time_fraction" in epoch for epoch in history)  # the ResNet-56 teacher took part


def test_shipped_mesa_recipe_runs_end_to_end(tmp_path, tiny_cifar_root):
    """recipes/resnet56-hesso-mesa.yaml as shipped, on tiny data with a tiny budget: HESSO and Mesa in one pass."""
    history = run_shipped_prune_recipe("resnet56-hesso-mesa.yaml", tmp_path / "run", tiny_cifar_root,
                                       epochs=2, max_steps_per_epoch=2, batch_size=16)
    assert all(epoch["saved_bytes"] > 0 for epoch in history)  # Mesa held the saved activations


def test_shipped_gating_recipe_runs_end_to_end(tmp_path, tiny_cifar_root):
    """recipes/resnet56-gating.yaml as shipped, on tiny data with a tiny budget: gates learned, frozen, cut."""
    history = run_shipped_prune_recipe("resnet56-gating.yaml", tmp_path / "run", tiny_cifar_root,
                                       epochs=2, max_steps_per_epoch=2, batch_size=16)
    assert all({"gate_sparsity", "gate_polarization", "macs_kept"} <= epoch.keys() for epoch in history)
    assert history[-1]["macs_kept"] <= 0.5


def test_gating_then_ternary_in_one_recipe(tmp_path, tiny_cifar_root, base_checkpoint):
    """Gating composes with ternary QAT in one run: the gated, cut model is what the quantize stage trains."""
    recipe = load_recipe(write_recipe(tmp_path, base_checkpoint, """
  - prune: {method: gating, macs: 0.6, epochs: 2, max_steps_per_epoch: 2, batch_size: 16,
            distill: {method: kd}}
  - quantize: {method: ternary, epochs: 1, max_steps_per_epoch: 2, batch_size: 16}
  - export"""))
    run_dir = run_recipe(recipe, tmp_path / "run", str(tiny_cifar_root))
    stages = json.loads((run_dir / "report.json").read_text())["stages"]
    assert [s["stage"] for s in stages][:3] == ["baseline", "prune", "quantize"]
    assert stages[2]["macs"] <= 0.6 * stages[0]["macs"]


def test_stage_keys_are_those_of_run_folders_made_before_the_catalogue():
    """A run folder resumes only if its done.json keys match: these were computed by the code before the
    technique catalogue (commit 16d2211) for the same recipe, so upgrading does not retrain finished stages."""
    from cifarpress.pipeline.compress import _stage_key
    from cifarpress.pipeline.recipe import recipe_from_dict

    raw = {"name": "k", "model": {"arch": "resnet20"},
           "stages": [{"train": {"epochs": 2}}, {"prune": {"macs": 0.5, "method": "dhspg", "penalty": 0.2}},
                      {"quantize": {"scale": "absmedian"}}, "export"]}
    recipe = recipe_from_dict(raw, Path("."), "k.yaml")
    assert [_stage_key(recipe, i) for i in range(5)] == [
        "cd4681fdf8c1b79e", "fcdf27be0df1c24a", "ddb3040f07bcad31", "cfad545d02b96104", "09c3e2001178be86"]


def test_shipped_prune_adapt_recipe_runs_end_to_end(tmp_path, tiny_cifar_root):
    """recipes/resnet20-prune-adapt.yaml as shipped, tiny budget: HESSO + KD, then AdaPT deploy + KD, exported."""
    import yaml

    from cifarpress.pipeline.recipe import recipe_from_dict

    path = REPO / "recipes" / "resnet20-prune-adapt.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["stages"][0]["prune"].update(pruning_periods=1, epochs=2, max_steps_per_epoch=3, batch_size=32)
    raw["stages"][1]["quantize"].update(epochs=1, max_steps_per_epoch=3, batch_size=32, min_lookback=2,
                                        max_lookback=2)
    raw["bench"] = {"batch_sizes": [1], "seconds": 0.05}
    run_dir = run_recipe(recipe_from_dict(raw, path.parent, path), tmp_path / "run", str(tiny_cifar_root))
    baseline, pruned, quantized = json.loads((run_dir / "report.json").read_text())["stages"]
    assert quantized["stage"] == "quantize" and quantized["macs"] == pruned["macs"] <= 0.55 * baseline["macs"]
    assert all("frac_bits" in layer for layer in quantized["layers"])
    model, info = load_model(run_dir / "02-quantize" / "model.pt")
    assert info["quantization"]["method"] == "adapt"


def test_export_stage_checks_int8_activations_by_the_quantized_default(tmp_path, tiny_cifar_root, base_checkpoint):
    # the export stage's tolerance defaults to each check's own: 1e-4 of the logits failed int8 activations
    # on CPUs without VNNI, where onnxruntime's int8 kernels saturate (exact where they have it, as here)
    recipe = load_recipe(write_recipe(tmp_path, base_checkpoint, """
        - quantize: {epochs: 1, max_steps_per_epoch: 2, batch_size: 32, act_bits: 8}
        - export
    """))
    run_dir = run_recipe(recipe, tmp_path / "run", str(tiny_cifar_root))
    quantized = json.loads((run_dir / "report.json").read_text())["stages"][-1]
    assert quantized["stage"] == "quantize" and quantized["onnx_check"]["top1_agreement"] >= 90.0
