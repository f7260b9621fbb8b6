"""Recipe validation: every mistake is one RecipeError that names the field; relative paths; the CLI's one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cifarpress.model_file as checkpoint_mod
from cifarpress.errors import CifarpressError, RecipeError
from cifarpress.pipeline.recipe import ExportStage, TrainStage, load_recipe

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cifarpress.cli"]

VALID = """\
name: tiny-run
dataset: cifar10
model:
  arch: resnet20
stages:
  - train: {epochs: 2, lr: 0.05, ema: true}
  - export
bench: {batch_sizes: [1, 4], seconds: 0.5, threads: 1}
"""


@pytest.fixture
def builtin_resnet20(monkeypatch, tmp_path_factory):
    """builtin:resnet20-cifar10 resolves: the shipped file, or a stand-in while it is being trained."""
    if not (checkpoint_mod.BUILTIN_DIR / "resnet20-cifar10.pt").is_file():
        folder = tmp_path_factory.mktemp("builtin")
        (folder / "resnet20-cifar10.pt").write_bytes(b"stand-in")
        monkeypatch.setattr(checkpoint_mod, "BUILTIN_DIR", folder)
    return checkpoint_mod.BUILTIN_DIR


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def recipe_error(path: Path) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message, message  # one problem, one line
    assert isinstance(info.value, CifarpressError) and info.value.exit_code == 2
    return message


def test_valid_recipe_loads(tmp_path):
    recipe = load_recipe(write(tmp_path, VALID))
    assert recipe.name == "tiny-run" and recipe.dataset == "cifar10"
    assert recipe.model.arch == "resnet20" and recipe.model.checkpoint is None
    assert [s.kind for s in recipe.stages] == ["train", "export"]
    train, export = (s.config for s in recipe.stages)
    assert isinstance(train, TrainStage) and (train.epochs, train.lr, train.ema) == (2, 0.05, True)
    assert train.batch_size == 128 and train.schedule == "cosine"  # defaults
    assert isinstance(export, ExportStage) and export.format == "onnx" and export.tolerance is None
    assert recipe.bench.batch_sizes == [1, 4] and recipe.bench.threads == 1 and recipe.bench.seconds == 0.5


def test_quickstart_recipe_validates_as_is(builtin_resnet20):
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert recipe.name == "quickstart"
    assert recipe.model.checkpoint == "builtin:resnet20-cifar10"
    assert [s.kind for s in recipe.stages] == ["export"]  # no training: minutes on any CPU
    export = recipe.stages[0].config
    assert export.precision == "int8" and export.max_drop == 1.0  # shows a compression effect, gated


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(builtin_resnet20, path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem  # the run folder is named after the file
    assert recipe.stages[-1].kind == "export"  # every shipped recipe ends in a deployable artifact


BASE = "name: r\nmodel: {arch: resnet20}\n"


@pytest.mark.parametrize("text, needles", [
    pytest.param(BASE + "stages: [train]\nstagez: []\n", ["stagez:", "unknown key"], id="unknown-top-level-key"),
    pytest.param(BASE + "stages:\n  - train: {epochz: 3}\n", ["stages[0].train.epochz:", "unknown key"],
                 id="unknown-key-in-stage"),
    pytest.param(BASE + "stages:\n  - train: {epochs: ten}\n", ["stages[0].train.epochs:", "integer"],
                 id="wrong-type"),
    pytest.param(BASE + "stages:\n  - train: {epochs: 1}\n  - train: {epochs: 0}\n",
                 ["stages[1].train.epochs:", "greater than or equal to 1"], id="out-of-range"),
    pytest.param(BASE + "stages:\n  - train: {momentum: 1.5}\n", ["stages[0].train.momentum:"], id="out-of-range-float"),
    pytest.param(BASE + "stages: [train]\nbench: {batch_sizes: [0]}\n", ["bench.batch_sizes:", ">= 1"],
                 id="bad-batch-size"),
    pytest.param(BASE + "stages:\n  - train\n  - distil: {amount: 0.5}\n", ["stages[1]:", "unknown stage 'distil'", "train"],
                 id="unknown-stage-type"),
    pytest.param(BASE + "stages:\n  - {train: {}, export: {}}\n", ["stages[0]:", "one key"], id="two-key-stage"),
    pytest.param(BASE + "stages:\n  - 7\n", ["stages[0]:", "one key"], id="stage-not-a-mapping"),
    pytest.param(BASE + "stages:\n  - train: 5\n", ["stages[0].train:"], id="stage-body-not-a-mapping"),
    pytest.param("name: r\ndataset: mnist\nmodel: {arch: resnet20}\nstages: [train]\n", ["dataset:", "cifar10"],
                 id="bad-dataset"),
    pytest.param("name: r\nstages: [train]\n", ["model:", "required"], id="missing-model"),
    pytest.param(BASE + "stages: []\n", ["stages:"], id="no-stages"),
    pytest.param("name: has space\nmodel: {arch: resnet20}\nstages: [train]\n", ["name:"], id="bad-name"),
])
def test_invalid_recipe_names_the_field(tmp_path, text, needles):
    path = write(tmp_path, text)
    message = recipe_error(path)
    assert message.startswith(f"{path}: "), message
    for needle in needles:
        assert needle in message, message


def test_missing_checkpoint_file(tmp_path):
    path = write(tmp_path, "name: r\nmodel: {arch: resnet20, checkpoint: models/nope.pt}\nstages: [export]\n")
    message = recipe_error(path)
    assert "model.checkpoint" in message
    assert str(tmp_path / "models" / "nope.pt") in message  # resolved against the recipe's folder


def test_unknown_builtin_checkpoint(tmp_path, builtin_resnet20):
    path = write(tmp_path, "name: r\nmodel: {arch: resnet20, checkpoint: 'builtin:resnet9000-cifar10'}\n"
                           "stages: [export]\n")
    message = recipe_error(path)
    assert "model.checkpoint" in message and "resnet9000-cifar10" in message
    assert "resnet20-cifar10" in message  # lists what is available


def test_invalid_yaml_gives_line_number(tmp_path):
    path = write(tmp_path, "name: r\nmodel: {arch: resnet20}\nstages:\n  - train: {epochs: 1\n  - export\n")
    message = recipe_error(path)
    assert str(path) in message and "not valid YAML" in message
    assert "line " in message
    line = int(message.split("line ", 1)[1].split(",")[0])
    assert 4 <= line <= 6


@pytest.mark.parametrize("text", ["", "- train\n- export\n", "just a string\n"], ids=["empty", "list", "scalar"])
def test_recipe_that_is_not_a_mapping(tmp_path, text):
    message = recipe_error(write(tmp_path, text))
    assert "mapping" in message


def test_recipe_file_not_found(tmp_path):
    message = recipe_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "not found" in message


def test_untrained_model_must_be_trained_first(tmp_path):
    message = recipe_error(write(tmp_path, "name: r\nmodel: {arch: resnet20}\nstages:\n  - export: {}\n"))
    assert "stages[0]" in message and "train" in message and "model.checkpoint" in message


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "project" / "recipes"
    (recipe_dir / "models").mkdir(parents=True)
    (recipe_dir / "models" / "start.pt").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(recipe_dir, "name: r\ndata_root: ../data\nmodel: {arch: resnet20, checkpoint: models/start.pt}\n"
                             "stages: [export]\n")
    recipe = load_recipe(path)
    assert Path(recipe.model.checkpoint) == (recipe_dir / "models" / "start.pt").resolve()
    assert Path(recipe.data_root).resolve() == (tmp_path / "project" / "data").resolve()
    # the same file given by a relative path from another folder
    monkeypatch.chdir(tmp_path / "project")
    again = load_recipe(Path("recipes") / "recipe.yaml")
    assert Path(again.model.checkpoint) == (recipe_dir / "models" / "start.pt").resolve()


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CIFARPRESS_NO_DOWNLOAD="1", COLUMNS="80")
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path):
    # a long message in a narrow terminal must still be one line
    write(tmp_path, BASE + "stages:\n  - train: {epochs: 1, batch_size: 64}\n  - train: {epochs: ten}\n", "bad.yaml")
    proc = cli(["compress", "bad.yaml", "--threads", "1"], tmp_path)
    assert_one_error_line(proc, 2, "bad.yaml: stages[1].train.epochs:", "valid integer")
    assert not (tmp_path / "runs").exists()


def test_cli_error_text_is_printed_literally(tmp_path):
    # square brackets in a path are not console markup
    folder = tmp_path / "[/v2]" / "[draft]"
    write(folder, "name: r\nmodel: {arch: resnet20}\nstages: [export]\n", "bad.yaml")
    proc = cli(["compress", str(folder / "bad.yaml")], tmp_path)
    assert_one_error_line(proc, 2, str(folder / "bad.yaml"), "stages[0]")


def test_catalogued_conflicts_fail_when_the_recipe_loads(tmp_path, monkeypatch):
    """A conflict a technique declares (Technique.excludes) is refused at validation, naming both."""
    import dataclasses

    from cifarpress import techniques
    from cifarpress.errors import RecipeError
    from cifarpress.pipeline.recipe import recipe_from_dict

    raw = {"name": "r", "model": {"arch": "resnet20"},
           "stages": [{"train": {"ema": True}}, {"quantize": {"ema": True, "distill": {"method": "kd"}}}]}
    recipe_from_dict(raw, tmp_path, "r.yaml")  # no conflict declared: fine
    monkeypatch.setitem(techniques.TECHNIQUES, "quantize",
                        dataclasses.replace(techniques.TECHNIQUES["quantize"], excludes=frozenset({"ema"})))
    with pytest.raises(RecipeError, match=r"stages\[1\].quantize: quantize cannot be combined with ema"):
        recipe_from_dict(raw, tmp_path, "r.yaml")
