"""The ONNX file contract every exported model keeps: input and output names, and the metadata that names
the dataset, classes and preprocessing (read here, written by cifarpress.export.onnx)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from cifarpress.errors import CifarpressError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def read_onnx_metadata(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise CifarpressError(f"{path} is a folder; give an ONNX file (.onnx) inside it")
    if not path.is_file():
        raise CifarpressError(f"ONNX file {path} not found; export one with `cifarpress export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CifarpressError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    if not proto.graph.node:  # protobuf parses an empty (or zeroed) file as an empty model
        raise CifarpressError(f"{path} is empty or not an ONNX model (no graph); export it again")
    meta = {p.key: p.value for p in proto.metadata_props}
    if "classes" in meta:
        meta["classes"] = json.loads(meta["classes"])
    return meta
