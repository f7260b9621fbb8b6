"""What this machine is: CPU model and SIMD features, software versions, and what its int8 kernels can do.

Every measurement cifarpress records carries `machine_record()`, because two
machines of the same CPU family can disagree: onnxruntime's x86 u8 x s8
kernels without VNNI (AVX2 `vpmaddubsw`) add pairs of 8-bit products in
saturating 16-bit lanes, so a full 8-bit weight range can clip sums that an
AVX-512 VNNI or AVX-VNNI host (`vpdpbusd`, 32-bit sums) computes exactly.
onnxruntime's own quantizer documents the same and recommends 7-bit weights
(`reduce_range`) on such CPUs: 2 x 255 x 64 = 32,640 fits in int16.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

# The flags worth naming for inference speed and int8 exactness (x86 /proc/cpuinfo spellings; ARM "Features").
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")
# Any of these gives exact 32-bit accumulation of u8 x s8 dot products in onnxruntime's CPU kernels.
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
# For tests and what-if measurements: CIFARPRESS_INT8_KERNELS=saturating|exact overrides the detection.
KERNELS_ENV = "CIFARPRESS_INT8_KERNELS"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, frozenset(flags)


def cpu_model() -> str:
    return _cpuinfo()[0]


def simd_features() -> list[str]:
    """The SIMD features of this CPU that matter here, in a fixed order (e.g. ['avx2', 'avx512f', ...])."""
    flags = _cpuinfo()[1]
    return [f for f in SIMD_FLAGS if f in flags]


def int8_kernels_exact() -> bool:
    """True when onnxruntime's integer kernels here accumulate 8-bit products without saturating."""
    forced = os.environ.get(KERNELS_ENV, "").strip().lower()
    if forced in ("exact", "saturating"):
        return forced == "exact"
    flags = _cpuinfo()[1]
    if not flags:  # not Linux, or unreadable: assume a modern CPU rather than degrade every graph
        return True
    return any(f in flags for f in EXACT_INT8_FLAGS)


def int8_kernel_note() -> str:
    if int8_kernels_exact():
        return "exact (VNNI-class dot products)"
    return "saturating 16-bit pair sums (no VNNI): weights run in 7-bit range on this CPU"


def _version(distribution: str) -> str | None:
    """The installed version, read from package metadata: importing TensorRT (or torch) just to ask is slow."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_record(with_versions: bool = True) -> dict:
    """CPU, cores, SIMD features, int8 kernel exactness, Python and (optionally) library versions."""
    from cifarpress.version import __version__

    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "simd": simd_features(),
              "int8_kernels": "exact" if int8_kernels_exact() else "saturating",
              "python": platform.python_version(), "system": platform.system(), "arch": platform.machine()}
    if with_versions:
        record["versions"] = {"cifarpress": __version__, "cifarpress_commit": _git_commit(),
                              "torch": _version("torch"), "onnxruntime": _version("onnxruntime"),
                              "onnx": _version("onnx"), "tensorrt": _version("tensorrt"),
                              "numpy": _version("numpy")}
    return record


def describe_machine(record: dict) -> str:
    """One line for table titles: 'AMD EPYC ... (avx2, avx512f, avx512_vnni; int8 exact)'."""
    simd = [f for f in record.get("simd", []) if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                        "asimddp", "i8mm")]
    kernels = record.get("int8_kernels")
    return f"{record.get('cpu', '?')} ({', '.join(simd) or 'no AVX2'}" + (f"; int8 {kernels})" if kernels else ")")
