"""The real CIFAR-10 copy ($CIFARPRESS_DATA) and the shipped ResNet-20/56: accuracy in PyTorch and through ONNX."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import cifarpress
from cifarpress.runtime.ort import onnx_accuracy
from cifarpress.model_file import load_model
from cifarpress.data import balanced_subset, dataset_spec, load_split
from cifarpress.export.onnx import check_onnx, export_onnx
from cifarpress.train.trainer import evaluate

from conftest import CLASSES

PRETRAINED_DIR = Path(cifarpress.__file__).parent / "pretrained"
# builtin name -> the least top-1 it must reach on the real test set (it also must reproduce what its file records)
SHIPPED = {"resnet20-cifar10": 85.0, "resnet56-cifar10": 87.0}


@pytest.fixture(scope="module")
def real_test(real_cifar_root):
    return load_split("cifar10", "test", real_cifar_root, download_if_missing=False)


def test_real_test_split_is_complete_and_balanced(real_test):
    assert len(real_test) == 10000
    assert real_test.images.shape == (10000, 3, 32, 32) and real_test.images.dtype == torch.uint8
    assert torch.bincount(real_test.labels, minlength=10).tolist() == [1000] * 10
    assert real_test.classes == CLASSES


def test_balanced_subset_of_the_real_train_split(real_cifar_root):
    train = load_split("cifar10", "train", real_cifar_root, download_if_missing=False)
    assert len(train) == 50000
    idx = balanced_subset(train.labels, 500)
    assert len(idx) == 500 and len(torch.unique(idx)) == 500
    assert torch.equal(idx, idx.sort().values)
    assert torch.bincount(train.labels[idx], minlength=10).tolist() == [50] * 10
    assert torch.equal(idx, balanced_subset(train.labels, 500))  # fixed: same subset every time
    sub = train.subset(idx)
    assert len(sub) == 500 and torch.equal(sub.images[0], train.images[idx[0]])


# Test images 0-999: the official pixels in the setup's build (--test mixed), the JPEG copy elsewhere.
# A thousand images keep these checks quick on slow CPUs; `cifarpress eval` gives the full figures.
FIRST = 1000


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def pretrained(request, real_test):
    """A shipped checkpoint, its builtin name and its PyTorch top-1 on test images 0-999."""
    name = request.param
    path = PRETRAINED_DIR / f"{name}.pt"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must test the checkpoints the package ships")
        pytest.skip(f"{path} not there yet (being trained)")
    torch.set_num_threads(1)
    model, info = load_model(f"builtin:{name}")
    assert info["arch"] == name.split("-")[0] and info["num_classes"] == 10 and info["dataset"] == "cifar10"
    model.eval()
    first = real_test.subset(torch.arange(FIRST))
    return model, name, first, evaluate(model, first)


def test_pretrained_top1(pretrained):
    """The shipped checkpoint is a trained one."""
    model, name, first, top1 = pretrained
    assert top1 >= SHIPPED[name], f"shipped {name} reaches only {top1:.2f}% on test images 0-999"


def test_pretrained_onnx_matches_pytorch(pretrained, tmp_path):
    model, name, first, top1 = pretrained
    path = export_onnx(model, tmp_path / f"{name}.onnx", dataset_spec("cifar10"), first.classes)
    check = check_onnx(model, path, first, images=500, tolerance=1e-4, threads=1)  # raises above 1e-4
    assert check.images == 500 and check.max_abs_diff <= 1e-4
    assert abs(onnx_accuracy(path, first, threads=1) - top1) <= 0.1  # at most one image of 1000 flips
