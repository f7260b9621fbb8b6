"""bench/jpeg_sensitivity.py: the re-encoded copy is a faithful, loadable, degraded twin of its source."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarpress.data import load_split

pytest.importorskip("PIL")
_spec = importlib.util.spec_from_file_location(
    "jpeg_sensitivity", Path(__file__).resolve().parents[1] / "bench" / "jpeg_sensitivity.py")
jpeg_sensitivity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jpeg_sensitivity)


def test_lower_quality_costs_more_psnr(tiny_cifar_root):
    rows = load_split("cifar10", "test", tiny_cifar_root).images.reshape(100, -1).numpy()
    assert jpeg_sensitivity.psnr(rows, rows) > 90  # identical images
    fine = jpeg_sensitivity.psnr(rows, jpeg_sensitivity.reencode(rows, 95, 0))
    coarse = jpeg_sensitivity.psnr(rows, jpeg_sensitivity.reencode(rows, 30, 2))
    assert 20 < coarse < fine


def test_build_keeps_labels_and_layout_and_resumes(tiny_cifar_root, tmp_path):
    out = jpeg_sensitivity.build(tiny_cifar_root, tmp_path, quality=50, subsampling=2)
    source, degraded = (load_split("cifar10", "test", root) for root in (tiny_cifar_root, tmp_path))
    assert torch.equal(source.labels, degraded.labels)
    assert degraded.images.shape == source.images.shape and degraded.classes == source.classes
    assert not torch.equal(source.images, degraded.images)
    assert not list(out.glob("*.tmp"))

    # An interrupted build (one batch missing) redoes only that batch.
    kept = (out / "data_batch_1").stat().st_mtime_ns
    (out / "test_batch").unlink()
    jpeg_sensitivity.build(tiny_cifar_root, tmp_path, quality=50, subsampling=2)
    assert (out / "data_batch_1").stat().st_mtime_ns == kept
    assert np.array_equal(load_split("cifar10", "test", tmp_path).images.numpy(), degraded.images.numpy())
