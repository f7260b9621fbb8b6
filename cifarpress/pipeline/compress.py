"""Run a recipe: stages in order, each in runs/<name>/<NN>-<stage>/, then a measured report.

Every model a stage produces is exported, checked in onnxruntime against
PyTorch and benched, which gives one report row per stage. A stage is done
when its `done.json` exists; it records a key made of the recipe up to that
stage, so re-running resumes after the last finished stage and a changed
stage (and everything after it) runs again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from cifarpress.data import CifarSplit, dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.errors import RecipeError
from cifarpress.export.api import is_fake_quantized, quantized_layer_rows
from cifarpress.model_file import load_model, save_model
from cifarpress.models import build_model, trusting
from cifarpress.pipeline import api
from cifarpress.pipeline.api import stage_plugins
from cifarpress.pipeline.recipe import (
    ExportStage,
    Recipe,
    applied_techniques,
    load_recipe,
    recipe_from_dict,
    stage_dir_name,
)
from cifarpress.pipeline.report import write_report
from cifarpress.pipeline.run_folder import RunFolder, check_can_clear
from cifarpress.profile import profile_model
from cifarpress.runtime.latency import machine_description
from cifarpress.utils.io import atomic_write_json

console = Console(stderr=True)


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    data_root: str | None
    _splits: dict = field(default_factory=dict)

    def split(self, name: str) -> CifarSplit:
        if name not in self._splits:
            self._splits[name] = load_split(self.recipe.dataset, name, self.data_root)
        return self._splits[name]

    @property
    def spec(self):
        return dataset_spec(self.recipe.dataset)


def _keyed_as_before(kind: str, body: dict) -> dict:
    """A stage body as the stage key saw it before the catalogue, so run folders made then still resume.

    A prune stage was one flat schema holding both methods' fields and no `ema`; it is now one class per
    method, and every training stage may carry every add-on. An export stage's tolerance defaulted to 1e-4
    (now each check's own default, None), which any export checked then also passes."""
    if kind == "export":
        return {"tolerance": 1e-4, **body}
    if kind != "prune":
        return body
    body = {k: v for k, v in body.items() if not (k == "ema" and v is False)}
    flat_defaults = {"pruning_periods": 5, "saliency": "fisher", "penalty": 0.1, "epsilon": 0.0}
    return {**flat_defaults, **body}


def _stage_key(recipe: Recipe, upto: int) -> str:
    """Hash of everything that determines stage `upto`'s output (the model and stages before it)."""
    stages = []
    for stage in recipe.stages[:upto]:
        dumped = stage.model_dump(exclude_none=True)
        stages.append({stage.kind: _keyed_as_before(stage.kind, dumped[stage.kind])})
    payload = {"dataset": recipe.dataset, "model": recipe.model.model_dump(), "stages": stages}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def export_checked(ctx: RunContext, model: torch.nn.Module, stage_dir: Path, info: dict,
                   images: int = 1000, tolerance: float | None = None) -> tuple[Path, dict]:
    """Export a stage's model through api.export (float ONNX, or QDQ plus packed file) and check it."""
    from cifarpress.export.fixed_point import is_fixed_point_int8

    # a deploy-mode AdaPT model becomes an int8 engine, calibrated on training images as the int8 export is
    calibration = ctx.split("train") if is_fixed_point_int8(model) else None
    exported = api.export(model, stage_dir / "model.onnx", data=ctx.split("test"), calibration=calibration,
                          check_images=images,
                          tolerance=tolerance, threads=ctx.recipe.bench.threads,
                          metadata={"arch": info["arch"], "stage": stage_dir.name})
    extra = {"packed": str(exported.packed), "packed_bytes": exported.packed.stat().st_size} if exported.packed else {}
    return exported.onnx, {"onnx_check": exported.check.to_dict(), **extra}


def _bench_fields(bench: dict) -> dict:
    """The report-row fields of a bench_onnx result."""
    return {
        "onnx_bytes": bench["onnx_bytes"], "top1": bench["top1"],
        "latency_ms": {b: {"p50": v["p50"], "p90": v["p90"], "p99": v["p99"]} for b, v in bench["latency_ms"].items()},
        "throughput_ips": {b: v["throughput_ips"] for b, v in bench["latency_ms"].items()},
        "peak_rss_bytes": bench["peak_rss_bytes"], "threads": bench["threads"], "onnxruntime": bench["onnxruntime"],
        "onnxruntime_lowering": bench["onnxruntime_lowering"],
        # A QDQ graph's own math (what TensorRT builds) beside this CPU's kernels, which can differ (no VNNI).
        **({"top1_graph": bench["top1_graph"]} if "top1_graph" in bench else {}),
        "model_rss_bytes": bench.get("model_rss_bytes"),
    }


def measure_model(ctx: RunContext, model: torch.nn.Module, stage_dir: Path, info: dict) -> dict:
    """Export, check and bench one stage's model; returns its report row."""
    test = ctx.split("test")
    onnx_path, checked = export_checked(ctx, model, stage_dir, info)
    prof = profile_model(model)
    bench = api.bench(onnx_path, test, batch_sizes=ctx.recipe.bench.batch_sizes, threads=ctx.recipe.bench.threads,
                      seconds=ctx.recipe.bench.seconds)
    row = {
        "params": prof.params, "macs": prof.macs, **_bench_fields(bench), "top1_torch": api.evaluate(model, test),
        **checked, "model": str(stage_dir / "model.pt"), "onnx": str(onnx_path),
    }
    layers = quantized_layer_rows(model)
    if layers is not None:
        row["layers"] = layers
    return row


def _run_training_stage(ctx: RunContext, kind: str, cfg, prev_model: Path, stage_dir: Path) -> Path:
    """Train with the stage's plug-ins, resumable inside the stage folder. The model trained is the previous
    stage's, or for a `distill` stage a new student (its arch, from its checkpoint or random weights)."""
    from cifarpress.pipeline.training import run_training

    arch, init = (cfg.arch, cfg.checkpoint) if kind == "distill" else (None, str(prev_model))
    run_training(arch=arch, dataset=ctx.recipe.dataset, out_dir=stage_dir, data_root=ctx.data_root, init=init,
                 kind=kind, body=cfg, teacher=str(prev_model), own_folder=False)
    return stage_dir / "model.pt"


def _run_export(ctx: RunContext, cfg: ExportStage, prev_model: Path, stage_dir: Path,
                prev_row: dict, first_row: dict) -> tuple[dict, dict | None]:
    """The deployable artifact, plus a report row when the export itself changes the model (int8).

    prev_row: the report row of the model entering the stage; first_row: that of the recipe's starting model."""
    model, info = load_model(prev_model)
    row = None
    if cfg.precision == "int8" and not (cfg.format == "tensorrt" and is_fake_quantized(model)):
        artifact, row = _export_int8(ctx, cfg, model, info, prev_model, stage_dir, prev_row)
    else:  # a quantized model's QDQ graph is already explicit int8 for TensorRT
        onnx_path, checked = export_checked(ctx, model, stage_dir, info, cfg.check_images, cfg.tolerance)
        artifact = {"artifact": str(onnx_path), "format": "onnx", "bytes": onnx_path.stat().st_size,
                    "source_model": str(prev_model), **checked}
    if cfg.format == "tensorrt":
        onnx_artifact = artifact
        engine = _tensorrt_engine(ctx, cfg, Path(onnx_artifact["artifact"]), stage_dir, first_row)
        artifact = {"artifact": engine["engine"], "format": f"tensorrt {cfg.precision}",
                    "bytes": engine["engine_bytes"], "source_model": str(prev_model), "onnx": onnx_artifact,
                    "tensorrt": engine}
    return artifact, row


def _tensorrt_engine(ctx: RunContext, cfg: ExportStage, onnx_path: Path, stage_dir: Path, first_row: dict) -> dict:
    """Build the deployable engine and time it, on the same GPU in the same run, beside an engine of the
    recipe's starting model: at fp16 (fp32 when the recipe asks for fp32), what would ship uncompressed."""
    batches = ctx.recipe.bench.batch_sizes
    test = ctx.split("test")

    def built_and_timed(onnx: str | Path, engine_name: str, precision: str) -> dict:
        engine = api.export(onnx, format="tensorrt", precision=precision, engine=stage_dir / engine_name,
                            opt_batch=max(batches), max_batch=max(batches))  # profile tuned for the largest batch
        return _engine_fields(api.bench(engine.path, test, batch_sizes=batches, device="gpu"))

    measured = built_and_timed(onnx_path, "model.engine", cfg.precision)
    ref_precision = "fp32" if cfg.precision == "fp32" else "fp16"
    try:
        reference = built_and_timed(first_row["onnx"], f"reference.{ref_precision}.engine", ref_precision)
    except CifarpressError as exc:  # the comparison is lost, not the deployable engine
        reference = {"error": str(exc)}
    measured["reference"] = {"model": first_row.get("model"), "precision": ref_precision, **reference}
    if "latency_ms" in reference:
        measured["ratios"] = {"engine_bytes": measured["engine_bytes"] / reference["engine_bytes"],
                              "top1_delta_pp": measured["top1"] - reference["top1"],
                              **{f"latency_p50_b{b}": measured["latency_ms"][b]["p50"] / reference["latency_ms"][b]["p50"]
                                 for b in measured["latency_ms"]}}
    return measured


def _engine_fields(bench: dict) -> dict:
    """The report fields of a bench_engine result (latency includes host copies, as a deployment sees it)."""
    return {"engine": bench["model"], "engine_bytes": bench["engine_bytes"], "precision": bench["precision"],
            "tensorrt": bench["tensorrt"], "gpu": bench["machine"].get("gpu"), "top1": bench["top1"],
            "latency_ms": {b: {k: v[k] for k in ("p50", "p90", "p99")} for b, v in bench["latency_ms"].items()},
            "compute_latency_ms": {b: {k: v[k] for k in ("p50", "p99")} for b, v in bench["compute_latency_ms"].items()},
            "gpu_memory": bench["gpu_memory"]}


def _export_int8(ctx: RunContext, cfg: ExportStage, model: torch.nn.Module, info: dict, prev_model: Path,
                 stage_dir: Path, prev_row: dict) -> tuple[dict, dict]:
    """Post-training int8 QDQ export, measured like a stage (its accuracy is onnxruntime's on the int8 graph)."""
    if is_fake_quantized(model):
        raise CifarpressError("export: precision int8 with format onnx takes a float model, but the model entering "
                              "it is already quantized (a quantize stage); drop precision: int8 or the quantize stage")
    test, threads = ctx.split("test"), ctx.recipe.bench.threads
    exported = api.export(model, stage_dir / "model.onnx", precision="int8", data=test, calibration=ctx.split("train"),
                          calibrator=cfg.calibrator, calib_images=cfg.calib_images, check_images=cfg.check_images,
                          metadata={"arch": info["arch"], "stage": stage_dir.name}, threads=threads,
                          exclude=cfg.exclude, max_drop=cfg.max_drop)
    bench = api.bench(exported.path, test, batch_sizes=ctx.recipe.bench.batch_sizes, threads=threads,
                      seconds=ctx.recipe.bench.seconds)
    row = {
        "stage": "export-int8", "dir": str(stage_dir), "params": prev_row["params"], "macs": prev_row["macs"],
        **_bench_fields(bench), "top1_torch": prev_row["top1_torch"],  # the float model's, measured already
        "onnx_check": exported.check.to_dict(), "onnx_check_reference": "the float model in PyTorch",
        "onnx_check_graph": exported.graph_check.to_dict(), "top1_drop_pp_check_images": exported.top1_drop_pp,
        "float_layers": list(cfg.exclude),
        "calibrator": cfg.calibrator, "calib_images": exported.manifest["count"],
        "model": str(prev_model), "onnx": str(exported.path),
    }
    artifact = {"artifact": str(exported.path), "format": "onnx (int8 QDQ)", "bytes": exported.path.stat().st_size,
                "source_model": str(prev_model), "tensorrt_rule_violations": exported.violations}
    return artifact, row


def _baseline(ctx: RunContext, stage_dir: Path) -> Path:
    spec = ctx.recipe.model
    if spec.checkpoint:
        model, info = load_model(spec.checkpoint, spec.arch, ctx.spec.num_classes)  # class count: plain state dicts
        if info["num_classes"] != ctx.spec.num_classes:
            raise CifarpressError(f"model.checkpoint has {info['num_classes']} outputs but {ctx.recipe.dataset} "
                                  f"has {ctx.spec.num_classes} classes; fix dataset or checkpoint")
        arch = info["arch"]
    else:
        torch.manual_seed(0)
        model, arch = build_model(spec.arch, ctx.spec.num_classes), spec.arch
    return save_model(stage_dir / "model.pt", model, arch, ctx.spec.num_classes, ctx.recipe.dataset,
                      {"source": spec.checkpoint or "random init"}, techniques=info.get("techniques") if spec.checkpoint else None)


def _stage_metrics(done: dict) -> dict:
    """metrics.json of a stage: its report row, or for an export its artifact (plus its row, for int8)."""
    if done["stage"] != "export":
        return done["row"]
    return {**done["artifact"], **({"row": done["row"]} if done.get("row") else {})}


def run_recipe(recipe: Recipe | str | Path | dict, out_dir: str | Path | None = None, data_root: str | None = None,
               force: bool = False) -> Path:
    """Run (or resume) a recipe: a YAML file, a mapping of the same shape, or a loaded Recipe. Every stage's
    model is exported, checked and benched; returns the run folder holding report.json and report.md.
    Re-running resumes after the last finished stage (force: start over). Relative paths in a mapping are
    read from the current folder.

        run_dir = cifarpress.run_recipe("recipes/quickstart.yaml", "runs/quickstart")
        report = json.loads((run_dir / "report.json").read_text())
    """
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe, Path.cwd(), "run_recipe()", relative_to="the current folder")
    elif not isinstance(recipe, Recipe):
        raise RecipeError(f"run_recipe(): recipe is a {type(recipe).__name__}; give a recipe file, a mapping or "
                          f"a Recipe")
    run_dir = Path(out_dir) if out_dir else Path("runs") / recipe.name
    ctx = RunContext(recipe, run_dir, data_root or recipe.data_root)
    # Fail early, before any work and before --force deletes anything: the data, TensorRT, the folder.
    ctx.split("test")
    if any(s.kind == "export" and s.config.format == "tensorrt" for s in recipe.stages):
        from cifarpress.runtime.tensorrt import require_tensorrt

        require_tensorrt()  # one sentence on a machine without TensorRT or a GPU, before any training
    if force:
        check_can_clear(run_dir)
    # The recipe names these factories, so model files in this run may name them too (see models.trusting).
    factories = [recipe.model.arch] + [s.config.arch for s in recipe.stages if s.kind == "distill"]
    with trusting(*factories), RunFolder(run_dir, force, command=f"cifarpress compress {recipe.name}"):
        return _run_stages(ctx, recipe, run_dir)


def retime_interleaved(run_dir: Path, recipe: Recipe, rows: list[dict]) -> None:
    """Time every row's file again, in turn, over `bench.rounds` rounds (cifarpress.runtime.latency.interleaved_latency):
    the stages were measured minutes apart, so machine noise would otherwise land in the ratios. Each row's p50
    becomes the median over rounds, with the range beside it; p90/p99 stay those of its own stage's run.
    Cached in latency.json while the files and bench settings stay the same, so a re-run costs nothing."""
    from cifarpress.runtime.latency import interleaved_latency

    spec = recipe.bench
    files = {f"{i}:{row['stage']}": Path(row["onnx"]) for i, row in enumerate(rows)}
    key = {"bench": spec.model_dump(), "files": {name: [str(p), p.stat().st_mtime_ns, p.stat().st_size]
                                                 for name, p in files.items()}}
    cache = run_dir / "latency.json"
    try:
        cached = json.loads(cache.read_text()) if cache.exists() else None
    except (OSError, ValueError):
        cached = None
    if cached and cached.get("key") == key:
        measured = cached["latency"]
    else:
        console.print(f"timing {len(files)} models side by side: {spec.rounds} rounds of "
                      f"{spec.seconds:g} s per batch size each")
        measured = interleaved_latency(files, spec.batch_sizes, spec.threads, spec.seconds, spec.rounds)
        atomic_write_json(cache, {"key": key, "latency": measured})
    for name, row in zip(files, rows):
        runs = measured["rounds"][name]
        for batch in row["latency_ms"]:
            values = [r[batch] for r in runs if batch in r]
            if values:
                row["latency_ms"][batch]["p50"] = measured["p50"][name][batch]
                row["latency_ms"][batch]["p50_range"] = [min(values), max(values)]
        row["latency_rounds"] = spec.rounds


def _read_done(done_file: Path) -> dict | None:
    """A stage's done.json, or None when it is unreadable (a kill while writing it): the stage runs again."""
    try:
        done = json.loads(done_file.read_text())
        if isinstance(done, dict) and "key" in done:
            return done
    except (OSError, ValueError):
        pass
    console.print(f"[yellow]{done_file} is unreadable; running that stage again[/]")
    return None


def _run_stages(ctx: RunContext, recipe: Recipe, run_dir: Path) -> Path:
    stages = [("baseline", None)] + [(s.kind, s.config) for s in recipe.stages]
    rows, artifacts, prev_model = [], [], None
    bench = recipe.bench.model_dump(exclude={"rounds"})  # what each stage's own measurement depends on
    for index, (kind, cfg) in enumerate(stages):
        stage_dir = run_dir / stage_dir_name(index, kind)
        done_file = stage_dir / "done.json"
        key = _stage_key(recipe, index)
        done = _read_done(done_file) if done_file.exists() else None
        if done is not None:
            if done.get("key") == key:
                if done.get("row") and done.get("bench") != bench:
                    # Same model, other bench settings: measure it again (no retraining), so every
                    # report row has the recipe's batch sizes and threads.
                    if kind == "export":
                        done["artifact"], done["row"] = _run_export(ctx, cfg, prev_model, stage_dir, rows[-1], rows[0])
                    else:
                        model, info = load_model(done["model"])
                        done["row"] = {"stage": kind, "dir": str(stage_dir),
                                       **measure_model(ctx, model, stage_dir, info)}
                    done["bench"] = bench
                    atomic_write_json(stage_dir / "metrics.json", _stage_metrics(done))
                    atomic_write_json(done_file, done)
                    console.print(f"{stage_dir.name}: done earlier; bench settings changed, measured again")
                else:
                    console.print(f"[dim]{stage_dir.name}: done earlier, skipped[/]")
                rows += [done["row"]] if done.get("row") else []
                artifacts += [done["artifact"]] if done.get("artifact") else []
                prev_model = Path(done["model"]) if done.get("model") else prev_model
                continue
            # The recipe changed at this stage: it and every later stage run again.
            for later in sorted(run_dir.glob("[0-9][0-9]-*")):
                if int(later.name[:2]) >= index:
                    shutil.rmtree(later)
        stage_dir.mkdir(parents=True, exist_ok=True)
        console.rule(f"[bold]{stage_dir.name}")
        done = {"key": key, "stage": kind, "dir": str(stage_dir), "bench": bench}
        if kind == "export":
            done["artifact"], row = _run_export(ctx, cfg, prev_model, stage_dir, rows[-1], rows[0])
            if row:
                done["row"] = row
                rows.append(row)
                console.print(f"{stage_dir.name}: int8 top-1 {row['top1']:.2f}% (onnxruntime)  "
                              f"ONNX {row['onnx_bytes'] / 1e6:.2f} MB")
            atomic_write_json(stage_dir / "metrics.json", _stage_metrics(done))
            if done["artifact"].get("tensorrt"):
                trt = done["artifact"]["tensorrt"]
                console.print(f"{stage_dir.name}: TensorRT {cfg.precision} engine on {trt['gpu']}: top-1 "
                              f"{trt['top1']:.2f}%, {trt['engine_bytes'] / 1e6:.2f} MB")
            artifacts.append(done["artifact"])
        else:
            model_path = (_baseline(ctx, stage_dir) if kind == "baseline"
                          else _run_training_stage(ctx, kind, cfg, prev_model, stage_dir))
            model, info = load_model(model_path)
            row = {"stage": kind, "dir": str(stage_dir), **measure_model(ctx, model, stage_dir, info)}
            atomic_write_json(stage_dir / "metrics.json", row)
            done.update(row=row, model=str(model_path))
            rows.append(row)
            prev_model = model_path
            console.print(f"{stage_dir.name}: top-1 {row['top1']:.2f}%  params {row['params']:,}  "
                          f"MACs {row['macs'] / 1e6:.1f}M  ONNX {row['onnx_bytes'] / 1e6:.2f} MB")
        atomic_write_json(done_file, done)  # written last: a stage without it is not finished
    retime_interleaved(run_dir, recipe, rows)
    from cifarpress.data import describe_split

    write_report(run_dir, recipe, rows, artifacts, machine_description(), describe_split(ctx.split("test")))
    return run_dir


# What callers (the contract test, the bench scripts) read from here besides run_recipe.
__all__ = ["RunContext", "applied_techniques", "export_checked", "measure_model", "retime_interleaved", "run_recipe",
           "stage_plugins"]
