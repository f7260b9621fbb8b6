"""`cifarpress export`: a model file or an ONNX file through api.export, with the command's default file
names and its result lines. Everything that decides what kind of file is written is api.export's."""
from __future__ import annotations

import tempfile
from pathlib import Path

from cifarpress.data import check_classes, dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.export.api import int8_sensitivity_file, is_fake_quantized
from cifarpress.model_file import load_model
from cifarpress.pipeline import api


def export_file(checkpoint: str, output: Path | None, fmt: str, precision: str | None, max_batch: int,
                calib_images: int, calibrator: str, data_root, check_images: int, tolerance: float | None,
                arch: str | None, max_drop: float | None, exclude: list[str], sensitivity: bool, say) -> None:
    """A model file or an ONNX file to a checked ONNX (fp32, a quantized model's QDQ, or int8 PTQ) and
    optionally a TensorRT engine; `say` prints each result line."""
    # The options in the command's own words, before any file or data is read (api.export checks them again)
    int8_only = exclude or max_drop is not None or sensitivity
    precision = api.export_precision(fmt, precision, "--max-drop, --exclude and --sensitivity" if int8_only else None,
                                     flag=lambda name: "--" + name)
    if fmt == "tensorrt":
        from cifarpress.runtime.tensorrt import require_tensorrt

        require_tensorrt()  # fail in one sentence before any work on a machine without it
    if checkpoint.endswith(".onnx") and fmt == "onnx" and precision != "int8":
        raise CifarpressError(f"{checkpoint} is already ONNX; pass --format tensorrt to build an engine from it, "
                              f"or --precision int8 to quantize it")
    options = dict(format=fmt, precision=precision, max_batch=max_batch, calib_images=calib_images,
                   calibrator=calibrator, check_images=check_images, max_drop=max_drop, exclude=list(exclude))
    if checkpoint.endswith(".onnx"):
        _from_onnx(say, Path(checkpoint), output, options, sensitivity, data_root)
        return
    model, info = load_model(checkpoint, arch)
    spec = dataset_spec(info["dataset"] or "cifar10")
    test = load_split(spec.name, "test", data_root)
    check_classes(info["num_classes"], test)
    source = Path(checkpoint)
    stem = source.with_suffix("") if source.suffix == ".pt" else Path(info["arch"])
    int8 = precision == "int8" and not is_fake_quantized(model)
    if precision == "int8" and not int8 and fmt == "onnx":
        raise CifarpressError(f"{checkpoint} is already quantized (ternary); export it without --precision int8")
    # Both formats get int8 from our own calibration into a QDQ graph checked against the float model:
    # TensorRT then builds it as explicit int8 (its implicit calibrators are deprecated in 10, gone in 11).
    path = output if (output and fmt == "onnx") else (Path(f"{stem}.int8.onnx") if int8 else stem.with_suffix(".onnx"))
    train = load_split(spec.name, "train", data_root) if int8 else None
    exported = api.export(model, path, data=test, calibration=train, tolerance=tolerance,  # engine: beside the ONNX
                          engine=output if fmt == "tensorrt" else None, metadata={"arch": info["arch"]}, **options)
    if int8:
        _print_int8(say, exported, calibrator, "PyTorch fp32")
        if sensitivity:
            with tempfile.TemporaryDirectory() as tmp:
                float_path = api.export(model, Path(tmp) / "float.onnx", data=test, check_images=10,
                                        metadata={"arch": info["arch"]}).path
                _sensitivity(say, float_path, exported, train, test, calibrator, check_images)
    else:
        check = exported.check
        say(f"{exported.onnx}: {exported.onnx.stat().st_size / 1e6:.2f} MB; onnxruntime vs PyTorch on {check.images} "
            f"test images: max |diff| {check.max_abs_diff:.2e}, top-1 agreement {check.top1_agreement:.2f}%")
    if exported.engine:
        _say_engine(say, exported.engine, precision)


def _from_onnx(say, path: Path, output: Path | None, options: dict, sensitivity: bool, data_root) -> None:
    """int8 and TensorRT engines from a cifarpress ONNX file alone (api.export on the file)."""
    from cifarpress.runtime.onnx_file import read_onnx_metadata
    from cifarpress.runtime.tensorrt import onnx_has_qdq

    dataset = read_onnx_metadata(path).get("dataset") or "cifar10"  # also: a missing or unreadable file, in words
    fmt, precision = options["format"], options["precision"]
    quantizes = precision == "int8" and not onnx_has_qdq(path)
    train = test = None
    if quantizes:
        train, test = load_split(dataset, "train", data_root), load_split(dataset, "test", data_root)
    target = output if (output and fmt == "onnx") else path.with_suffix(".int8.onnx")
    exported = api.export(path, target, data=test, calibration=train, engine=output if fmt == "tensorrt" else None,
                          **options)
    if quantizes:
        _print_int8(say, exported, options["calibrator"], "the float ONNX")
        if sensitivity:
            _sensitivity(say, path, exported, train, test, options["calibrator"], options["check_images"])
    if exported.engine:
        _say_engine(say, exported.engine, precision)


def _say_engine(say, engine: Path, precision: str) -> None:
    say(f"{engine}: {engine.stat().st_size / 1e6:.2f} MB TensorRT {precision} engine (+ {engine.name}.json)")


def _print_int8(say, exported: api.Exported, calibrator: str, reference: str) -> None:
    from cifarpress.runtime.host import int8_kernels_exact

    rules = "follows TensorRT's explicit-quantization rules" if not exported.violations else "breaks TensorRT rules"
    graph = exported.graph_check
    say(f"{exported.onnx}: {exported.onnx.stat().st_size / 1e6:.2f} MB int8 QDQ ({calibrator} calibration on "
        f"{exported.manifest['count']} training images; {rules}); top-1 agreement with {reference} on "
        f"{exported.check.images} test images: the graph's own math (what TensorRT builds) "
        f"{graph.top1_agreement:.2f}%, onnxruntime on this CPU's int8 kernels "
        f"{exported.check.top1_agreement:.2f}%"
        + ("" if int8_kernels_exact() else " (no VNNI here: weights run in 7-bit range)")
        + (f"; top-1 lost against it: {exported.top1_drop_pp:.2f} pp" if exported.top1_drop_pp is not None else ""))


def _sensitivity(say, float_path: Path, exported: api.Exported, train, test, calibrator: str,
                 check_images: int) -> None:
    """Say the per-layer int8 sensitivity ranking, written beside the int8 file."""
    from rich.table import Table

    ranking, target, images = int8_sensitivity_file(float_path, exported.onnx, exported.manifest, train, test,
                                                    calibrator, check_images)
    table = Table(title=f"int8 sensitivity: top-1 lost on {images} test images when one layer alone is int8")
    for col in ("layer", "op", "Δ top-1 pp"):
        table.add_column(col, justify="right" if col.startswith("Δ") else "left")
    for row in ranking:
        table.add_row(row["layer"], row["op"], f"{0.0 - row['top1_drop_pp']:+.2f}")
    say(table)
    say(f"wrote {target}; keep the worst in float with --exclude LAYER")
