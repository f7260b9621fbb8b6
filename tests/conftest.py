"""Shared fixtures: a tiny synthetic CIFAR-10 in the canonical layout, and the real copy.

The synthetic images are learnable (each class has its own colour and stripe
pattern plus noise), so a few steps of training must beat chance on them.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(labels)
    palette = np.random.default_rng(1234).integers(30, 225, size=(10, 3))
    img = np.empty((n, 3, 32, 32), dtype=np.float32)
    img[:] = palette[labels][:, :, None, None]
    # class-specific stripe period so shape, not only colour, carries the label
    yy = np.arange(32)[None, :, None]
    stripes = ((yy // (labels[:, None, None] % 5 + 2)) % 2) * 40.0
    img += stripes[:, None, :, :]
    img += rng.normal(0, 20, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, -1)


def write_fake_cifar10(root: Path, train_per_batch: int = 40, test: int = 100, seed: int = 0) -> Path:
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = test if name == "test_batch" else train_per_batch
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(),
                 b"data": synthetic_images(labels, seed + k), b"filenames": [b"x.png"] * n}
        with open(out / name, "wb") as f:
            pickle.dump(batch, f)
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f)
    return root


@pytest.fixture(scope="session")
def tiny_cifar_root(tmp_path_factory) -> Path:
    """Folder holding a synthetic cifar-10-batches-py: 200 train and 100 test images."""
    return write_fake_cifar10(tmp_path_factory.mktemp("tiny-cifar"))


@pytest.fixture(scope="session")
def real_cifar_root() -> Path:
    """The real CIFAR-10 copy named by $CIFARPRESS_DATA; CI builds it from ../shared/data."""
    root = os.environ.get("CIFARPRESS_DATA")
    if root and (Path(root) / "cifar-10-batches-py" / "test_batch").exists():
        return Path(root)
    if os.environ.get("CI"):
        pytest.fail("CI must set CIFARPRESS_DATA to a built CIFAR-10 copy (see .ci/run)")
    pytest.skip("real CIFAR-10 not found; set CIFARPRESS_DATA (python ../shared/data/build_cifar10.py DIR)")


# Tests share 2 cores with each other and with training runs; keep them light. Set at import too, not
# only per test: module-scoped fixtures run before the autouse one, and a run trained on 2 threads is not
# bit-identical to its resume on 1 (test_hesso_resumes_bit_identical failed that way under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def torchscript_only_export(monkeypatch):
    """torch.onnx.export as on a model the dynamo exporter cannot trace: only the TorchScript fallback works."""
    dynamo_export = torch.onnx.export

    def torchscript_only(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("this model does not trace")
        return dynamo_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", torchscript_only)
