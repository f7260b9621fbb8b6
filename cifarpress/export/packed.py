"""The packed artifact: one file, 2 bits per ternary weight and b bits per b-bit weight, that rebuilds the exact model.

Layout (all little-endian):

    bytes 0..7    magic b"CPTERN1\\n"
    bytes 8..11   uint32 H, the length of the header
    next H bytes  UTF-8 JSON header: format, arch, num_classes, dataset, config
                  (TernaryConfig, keep list resolved), layers {name: precision},
                  tensors [[name, encoding, shape], ...], payload_bytes, meta
    the rest      the payload: each tensor listed in the header, raw, back to back,
                  in header order, with no padding

Encodings:
    "ternary2"   2 bits per weight, four per byte: code 0b00 = 0, 0b01 = +1,
                 0b10 = -1 (0b11 is invalid). Weight i of the C-order flattened
                 tensor sits in byte i // 4, bits 2*(i % 4) and 2*(i % 4) + 1, so
                 the first weight is in the lowest bits. The last byte is padded
                 with zero codes. Size: ceil(n / 4) bytes.
    "int8"       weights of 8-bit layers (the kept layers of a ternary policy), 1 byte each
    "nbit<b>"    weights of a b-bit layer, b != 8 (2 <= b <= 32): each code c in
                 [-qmax, qmax], qmax = 2^(b-1) - 1, stored as the unsigned b-bit
                 number c + qmax (all ones is invalid), weights back to back in one
                 bit stream: bit j of weight i is stream bit i*b + j, and stream bit
                 k sits in byte k // 8 at bit k % 8 (so, as in ternary2, the first
                 weight is in the lowest bits). Zero-padded to whole bytes.
                 Size: ceil(n * b / 8) bytes.
    "float32", "int64", ...   every other state-dict entry as stored: BN
                 parameters and running statistics, biases, activation ranges

A quantized layer NAME stores "NAME.weight" (ternary2, int8 or nbit<b>) and
"NAME.weight_scale" (float32, either 0-d or one value per output channel). The
scale is stored because it cannot be recovered: mean|Wq| is not the s that made
Wq. The loaded layers are therefore in deployed form (scale pinned, latent
weight = codes * scale). Re-quantizing them reproduces the same codes, and the
quantized weights and the outputs equal the original model's bit for bit.

Each layer's width is its precision in the header's layers map ("ternary",
"int8", "int4", ...), so the layers' `weight_bits` buffers are not stored again.
Versions: a model with only ternary and int8 layers is written exactly as before
per-layer widths existed (format cifarpress-ternary-packed/1), so older readers
still read it. A model with any other width is written as
cifarpress-ternary-packed/2, which older readers turn down by its format instead of
misreading the new encoding. This reader reads both.

Byte count of a file: 12 + H + sum(ceil(n/4) per ternary tensor) + sum(n per int8
tensor) + sum(ceil(n*b/8) per b-bit tensor) + 4 per scale value + the raw bytes of
every float/int tensor. For resnet20 (default policy), the 269,824 ternary weights
take 67,456 B. The float part (BN with its running statistics, and the fc bias)
takes 12,752 B, the two kept int8 layers 1,072 B, the scales 184 B and the header
about 7.5 KB. That is 88,958 B in all, against 1,188,175 B for the fp32 ONNX.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.models import build_model
from cifarpress.techniques.quantize.fake_quant import check_bits, qmax_for
from cifarpress.techniques.quantize.ternary import (
    TernaryConfig,
    config_from_model,
    quantize_model,
    quantized_layers,
)
from cifarpress.utils.io import atomic_write
from cifarpress.utils.modules import unwrap

MAGIC = b"CPTERN1\n"
FORMAT = "cifarpress-ternary-packed/1"
FORMAT_NBIT = "cifarpress-ternary-packed/2"  # holds nbit<b> tensors; see "Versions" above
FORMATS = (FORMAT, FORMAT_NBIT)
TERNARY = "ternary2"
NBIT_PREFIX = "nbit"
PLAIN_ENCODINGS = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
STORED_BY_LAYER = ("weight", "frozen_scale", "weight_bits")  # a layer's entries the header and codes carry
_TO_CODE = np.array([2, 0, 1], dtype=np.uint8)  # indexed by value + 1: -1 -> 0b10, 0 -> 0b00, +1 -> 0b01
_FROM_CODE = np.array([0, 1, -1, 0], dtype=np.int8)  # 0b11 never written; rejected before lookup


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """Values in {-1, 0, 1} (any shape) -> uint8 array of ceil(n/4) bytes, four codes per byte."""
    flat = np.asarray(codes).reshape(-1)
    if flat.size and not np.isin(flat, (-1, 0, 1)).all():
        raise ValueError("ternary codes must be -1, 0 or 1")
    two_bit = _TO_CODE[flat.astype(np.int64) + 1]
    two_bit = np.concatenate([two_bit, np.zeros(-flat.size % 4, np.uint8)]).reshape(-1, 4)
    return (two_bit[:, 0] | two_bit[:, 1] << 2 | two_bit[:, 2] << 4 | two_bit[:, 3] << 6).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of pack_ternary: the first `count` codes as int8 in {-1, 0, 1}."""
    two_bit = (np.asarray(packed, np.uint8)[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    two_bit = two_bit.reshape(-1)[:count]
    if (two_bit == 3).any():
        raise ValueError("invalid ternary code 0b11")
    return _FROM_CODE[two_bit]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes in [-qmax, qmax] of a b-bit grid (any shape) -> uint8 array of ceil(n*b/8) bytes."""
    qmax = qmax_for(bits)
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (np.abs(flat) > qmax).any():
        raise ValueError(f"{bits}-bit codes must lie in [-{qmax}, {qmax}]")
    offset = (flat + qmax).astype(np.uint64)
    stream = ((offset[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")  # packbits pads the last byte with zero bits


def unpack_codes(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of pack_codes: the first `count` codes as int16, or int32 for words above 16 bits."""
    qmax = qmax_for(bits)
    stream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[:count * bits]
    offset = stream.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    if (offset > 2 * qmax).any():
        raise ValueError(f"invalid {bits}-bit code")
    return (offset - qmax).astype(np.int16 if bits <= 16 else np.int32)


def _nbit_width(encoding: str) -> int | None:
    """b for "nbit<b>", else None."""
    digits = encoding.removeprefix(NBIT_PREFIX)
    if encoding.startswith(NBIT_PREFIX) and digits.isdigit():
        try:
            return check_bits(int(digits))
        except CifarpressError:
            return None
    return None


def _encoded_size(encoding: str, shape: list[int]) -> int:
    count = math.prod(shape)
    if encoding == TERNARY:
        return math.ceil(count / 4)
    bits = _nbit_width(encoding)
    if bits is not None:
        return math.ceil(count * bits / 8)
    if encoding not in PLAIN_ENCODINGS:
        raise CifarpressError(f"unknown encoding {encoding!r}; re-pack the file with this version of cifarpress")
    return count * np.dtype(encoding).itemsize


def _weight_entry(layer) -> tuple[str, np.ndarray]:
    """(encoding, bytes as uint8/int8 array) of a layer's codes: ternary2, int8 (8 bits, as ever) or nbit<b>."""
    codes = layer.weight_codes().cpu().numpy()
    if layer.ternary:
        return TERNARY, pack_ternary(codes.astype(np.int8))
    bits = int(layer.bits)
    if bits == 8:
        return "int8", codes.astype(np.int8)
    return f"{NBIT_PREFIX}{bits}", pack_codes(codes.astype(np.int64), bits)


def _plain_encoding(name: str, tensor: torch.Tensor) -> str:
    encoding = str(tensor.dtype).removeprefix("torch.")
    if encoding not in PLAIN_ENCODINGS:
        raise CifarpressError(f"state entry {name!r} has dtype {encoding}, which the packed format does not store; "
                              f"convert the model to float32 first")
    return encoding


def save_packed(model: nn.Module, path: str | os.PathLike, arch: str, num_classes: int, dataset: str,
                meta: dict | None = None) -> Path:
    """Write the fake-quant `model` as one packed file, atomically (see the module docstring for the layout)."""
    model = unwrap(model)
    layers = quantized_layers(model)
    config = config_from_model(model)  # raises when the model is not quantized
    entries: list[tuple[str, str, list[int], bytes]] = []
    accounting = {"ternary": 0, "int8": 0, "scales": 0, "other": 0}
    for name, layer in layers.items():
        encoding, data = _weight_entry(layer)
        scale = layer.weight_scale().detach().cpu().float().numpy()
        entries.append((f"{name}.weight", encoding, list(layer.weight.shape), data.tobytes()))
        entries.append((f"{name}.weight_scale", "float32", list(scale.shape), scale.astype("<f4").tobytes()))
        accounting[layer.precision] = accounting.get(layer.precision, 0) + data.nbytes
        accounting["scales"] += scale.nbytes
    stored_elsewhere = {f"{n}.{part}" for n in layers for part in STORED_BY_LAYER}
    for key, tensor in model.state_dict().items():
        if key in stored_elsewhere:
            continue
        array = tensor.detach().cpu().numpy()
        encoding = _plain_encoding(key, tensor)
        data = array.astype(np.dtype(encoding).newbyteorder("<")).tobytes()
        entries.append((key, encoding, list(array.shape), data))
        accounting["other"] += len(data)
    nbit = any(_nbit_width(encoding) is not None for _, encoding, _, _ in entries)
    header = {
        "format": FORMAT_NBIT if nbit else FORMAT, "arch": arch, "num_classes": int(num_classes), "dataset": dataset,
        "config": config.to_dict(), "layers": {n: m.precision for n, m in layers.items()},
        "tensors": [[name, encoding, shape] for name, encoding, shape, _ in entries],
        "payload_bytes": accounting, "meta": meta or {},
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes)
            for *_, data in entries:
                f.write(data)

    return atomic_write(path, write)


def _read(path: str | os.PathLike) -> tuple[dict, bytes]:
    path = Path(path)
    if not path.is_file():
        raise CifarpressError(f"packed model {path} not found; write one with save_packed")
    blob = path.read_bytes()
    if blob[:len(MAGIC)] != MAGIC or len(blob) < len(MAGIC) + 4:
        raise CifarpressError(f"{path} is not a cifarpress packed ternary model (bad magic); check the path")
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(blob[start:start + length].decode())
    except (UnicodeDecodeError, ValueError):
        raise CifarpressError(f"{path} has a corrupt header; write the file again with save_packed") from None
    if header.get("format") not in FORMATS:
        raise CifarpressError(f"{path} is in format {header.get('format')!r}, not {' or '.join(FORMATS)}; "
                              f"re-pack it with this version of cifarpress")
    payload = blob[start + length:]
    try:
        expected = sum(_encoded_size(enc, shape) for _, enc, shape in header["tensors"])
    except CifarpressError as exc:
        raise CifarpressError(f"{path}: {exc}") from None
    if len(payload) != expected:
        raise CifarpressError(f"{path} holds {len(payload)} payload bytes but its header lists {expected}; "
                              f"the file is truncated or corrupt, so write it again")
    return header, payload


def read_packed_header(path: str | os.PathLike) -> dict:
    """The JSON header (arch, dataset, config, layers, byte accounting) without building the model."""
    return _read(path)[0]


def _decode(header: dict, payload: bytes, path) -> dict[str, torch.Tensor]:
    tensors, offset = {}, 0
    for name, encoding, shape in header["tensors"]:
        size = _encoded_size(encoding, shape)
        raw = np.frombuffer(payload, np.uint8, size, offset)
        offset += size
        bits = _nbit_width(encoding)
        if encoding == TERNARY:
            try:
                array = unpack_ternary(raw, math.prod(shape)).reshape(shape)
            except ValueError:
                raise CifarpressError(f"{path}: tensor {name!r} holds an invalid ternary code; "
                                      f"the file is corrupt, so write it again") from None
        elif bits is not None:
            try:
                array = unpack_codes(raw, math.prod(shape), bits).reshape(shape)
            except ValueError:
                raise CifarpressError(f"{path}: tensor {name!r} holds an invalid {bits}-bit code; "
                                      f"the file is corrupt, so write it again") from None
        else:  # a plain encoding (_read has turned down unknown ones)
            array = raw.view(np.dtype(encoding).newbyteorder("<")).reshape(shape).astype(encoding)
        tensors[name] = torch.from_numpy(array.copy())
    return tensors


def load_packed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the fake-quant model from a packed file, in eval mode, with every quantized layer deployed."""
    header, payload = _read(path)
    tensors = _decode(header, payload, path)
    model = build_model(header["arch"], header["num_classes"], recorded_in=str(path))
    precisions = quantize_model(model, TernaryConfig.from_dict(header["config"]))
    written = header["layers"]
    # The config's keep list makes the same layers ternary; the header then gives the non-ternary ones their widths.
    if precisions.keys() != written.keys() or any((p == "ternary") != (written[n] == "ternary")
                                                 for n, p in precisions.items()):
        raise CifarpressError(f"{path} was written for different layers than '{header['arch']}' has now; "
                              f"re-pack it from the trained model")
    for name, layer in quantized_layers(model).items():
        try:
            layer.set_weight_bits(written[name])
        except CifarpressError:
            raise CifarpressError(f"{path}: layer {name!r} has precision {written[name]!r}, which this cifarpress "
                                  f"does not know; re-pack it with this version") from None
        layer.load_quantized(tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale"))
    result = model.load_state_dict(tensors, strict=False)
    set_by_layers = {f"{n}.{part}" for n in precisions for part in STORED_BY_LAYER}
    missing = [k for k in result.missing_keys if k not in set_by_layers]
    if missing or result.unexpected_keys:
        raise CifarpressError(f"{path} does not fit '{header['arch']}': missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}; check the architecture")
    return model.eval()
