"""cifarpress.data: loading both dataset layouts, download + md5, subsets, augmentation, the batch loader."""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarpress import data
from cifarpress.data import BatchLoader, CifarSplit, balanced_subset, dataset_spec, download, load_split, random_crop_flip
from cifarpress.errors import CifarpressError
from conftest import CLASSES, write_fake_cifar10


# -- loading -------------------------------------------------------------------

def test_load_split_cifar10_shapes_dtypes_and_classes(tiny_cifar_root):
    train = load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)
    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    assert train.images.shape == (200, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert len(train) == 200 and len(test) == 100
    assert train.classes == CLASSES
    assert train.spec.name == "cifar10" and train.spec.num_classes == 10
    # every class present, labels in range
    assert set(train.labels.tolist()) == set(range(10))
    # images keep the pickle's row order: first image of data_batch_1 reshaped to CHW
    with open(tiny_cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    first = torch.from_numpy(np.asarray(batch[b"data"][0], dtype=np.uint8).reshape(3, 32, 32))
    assert torch.equal(train.images[0], first)
    assert train.labels[0].item() == batch[b"labels"][0]


def write_fake_cifar100(root: Path, train: int = 300, test: int = 100) -> Path:
    out = root / "cifar-100-python"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("test", test)):
        fine = (np.arange(n) % 100).tolist()
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                 b"coarse_labels": [f // 5 for f in fine],
                 b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
        with open(out / name, "wb") as f:
            pickle.dump(batch, f)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    with open(out / "meta", "wb") as f:
        pickle.dump(meta, f)
    return root


def test_load_split_cifar100_layout(tmp_path):
    root = write_fake_cifar100(tmp_path)
    train = load_split("cifar100", "train", root, download_if_missing=False)
    test = load_split("cifar100", "test", root, download_if_missing=False)
    assert train.images.shape == (300, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert train.labels.tolist() == [i % 100 for i in range(300)]  # fine labels, not coarse
    assert len(train.classes) == 100 and train.classes[7] == "fine7"
    assert train.spec.num_classes == 100


def test_data_root_from_environment(tiny_cifar_root, monkeypatch):
    monkeypatch.setenv("CIFARPRESS_DATA", str(tiny_cifar_root))
    assert len(load_split("cifar10", "test", None, download_if_missing=False)) == 100


def test_bad_dataset_and_split_names(tiny_cifar_root):
    with pytest.raises(CifarpressError, match="cifar10"):
        load_split("cifar1000", "train", tiny_cifar_root)
    with pytest.raises(CifarpressError, match="'train' or 'test'"):
        load_split("cifar10", "val", tiny_cifar_root)


def test_missing_data_without_download_names_the_fixes(tmp_path):
    with pytest.raises(CifarpressError) as info:
        load_split("cifar10", "train", tmp_path / "empty", download_if_missing=False)
    message = str(info.value)
    assert "--data-root" in message and "CIFARPRESS_DATA" in message and "cifar-10-batches-py" in message


def test_no_download_environment_variable(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(data, "download", refuse)
    monkeypatch.setenv("CIFARPRESS_NO_DOWNLOAD", "1")
    with pytest.raises(CifarpressError, match="CIFARPRESS_NO_DOWNLOAD") as info:
        load_split("cifar10", "test", tmp_path)
    assert "--data-root" in str(info.value)


def test_missing_file_in_a_partial_copy_is_detected(tmp_path):
    root = write_fake_cifar10(tmp_path, train_per_batch=2, test=10)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert len(load_split("cifar10", "test", root, download_if_missing=False)) == 10
    with pytest.raises(CifarpressError, match="--data-root"):
        load_split("cifar10", "train", root, download_if_missing=False)


def test_corrupt_pickle_is_a_user_error(tmp_path):
    root = write_fake_cifar10(tmp_path, train_per_batch=2, test=10)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(CifarpressError, match="download again"):
        load_split("cifar10", "test", root, download_if_missing=False)


# -- download ------------------------------------------------------------------

@pytest.fixture
def tiny_archive(tmp_path) -> tuple[Path, str]:
    """A cifar-10-python.tar.gz holding a tiny fake copy, and its md5."""
    src = write_fake_cifar10(tmp_path / "src", train_per_batch=4, test=10)
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_with_correct_md5_unpacks_and_loads(tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    spec = dataclasses.replace(dataset_spec("cifar10"), md5=md5)
    root = tmp_path / "root"
    target = download(spec, root, url=archive.as_uri())
    assert target == root / "cifar-10-batches-py" and (target / "test_batch").is_file()
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # temp folder cleaned up
    train = load_split("cifar10", "train", root, download_if_missing=False)
    assert train.images.shape == (20, 3, 32, 32) and train.classes == CLASSES


def test_download_with_wrong_md5_fails_and_leaves_nothing(tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    spec = dataclasses.replace(dataset_spec("cifar10"), md5="0" * 32)
    root = tmp_path / "root"
    with pytest.raises(CifarpressError, match="md5") as info:
        download(spec, root, url=archive.as_uri())
    assert md5 in str(info.value) and "0" * 32 in str(info.value)
    assert list(root.iterdir()) == []
    with pytest.raises(CifarpressError):
        load_split("cifar10", "train", root, download_if_missing=False)


def test_download_from_unreachable_url_names_data_root(tmp_path):
    spec = dataset_spec("cifar10")
    missing = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()
    with pytest.raises(CifarpressError) as info:
        download(spec, tmp_path / "root", url=missing)
    assert "--data-root" in str(info.value) and "CIFARPRESS_DATA" in str(info.value)
    assert list((tmp_path / "root").iterdir()) == []


def test_load_split_downloads_when_missing(tiny_archive, tmp_path, monkeypatch):
    archive, md5 = tiny_archive
    monkeypatch.delenv("CIFARPRESS_NO_DOWNLOAD", raising=False)
    spec = dataclasses.replace(dataset_spec("cifar10"), url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(data.DATASETS, "cifar10", spec)
    test = load_split("cifar10", "test", tmp_path / "root")
    assert test.images.shape == (10, 3, 32, 32)


# -- balanced_subset -------------------------------------------------------------

def test_balanced_subset_is_balanced_sorted_and_deterministic():
    # unequal class sizes: class c has 5 + c members, shuffled
    labels = torch.cat([torch.full((5 + c,), c) for c in range(10)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    idx = balanced_subset(labels, 25, seed=0)
    assert len(idx) == 25 and len(set(idx.tolist())) == 25
    assert torch.equal(idx, idx.sort().values)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert counts == [3] * 5 + [2] * 5
    assert torch.equal(idx, balanced_subset(labels, 25, seed=0))
    assert not torch.equal(idx, balanced_subset(labels, 25, seed=1))
    full = balanced_subset(labels, len(labels), seed=0)
    assert torch.equal(full, torch.arange(len(labels)))


def test_balanced_subset_rejects_bad_sizes():
    labels = torch.arange(30) % 10
    with pytest.raises(CifarpressError, match="between 10 and 30"):
        balanced_subset(labels, 9)
    with pytest.raises(CifarpressError, match="between 10 and 30"):
        balanced_subset(labels, 31)


def test_balanced_subset_keeps_its_size_when_a_class_is_short():
    # class 0 has a single image; the other classes make up the shortfall
    labels = torch.tensor([0] + [c for c in range(1, 10) for _ in range(10)])
    idx = balanced_subset(labels, 50, seed=0)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts[0] == 1 and counts[1:].min() >= 5


# -- augmentation ------------------------------------------------------------------

def reference_crop_flip(images: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Slow per-image pad/crop/flip drawing from the generator in the same order (dy, dx, flip)."""
    n, c, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        canvas = torch.zeros((c, h + 2 * pad, w + 2 * pad), dtype=images.dtype)
        canvas[:, pad:pad + h, pad:pad + w] = images[i]
        crop = canvas[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@pytest.mark.parametrize("pad", [4, 2])
def test_random_crop_flip_matches_reference(pad):
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    got = random_crop_flip(images, torch.Generator().manual_seed(5), pad=pad)
    want = reference_crop_flip(images, torch.Generator().manual_seed(5), pad=pad)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, want)
    assert not torch.equal(got, images)  # it does augment


def test_random_crop_flip_without_padding_only_mirrors():
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(11)
    got = random_crop_flip(images, gen, pad=0)
    # with pad=0 the offsets are 0; the third draw decides the flips
    replay = torch.Generator().manual_seed(11)
    torch.randint(0, 1, (32,), generator=replay)
    torch.randint(0, 1, (32,), generator=replay)
    flip = torch.rand(32, generator=replay) < 0.5
    assert 0 < flip.sum() < 32
    assert torch.equal(got[~flip], images[~flip])  # identity where not flipped
    assert torch.equal(got[flip], images[flip].flip(-1))


# -- BatchLoader ----------------------------------------------------------------------

def make_split(n: int, fill=None) -> CifarSplit:
    spec = dataset_spec("cifar10")
    labels = torch.arange(n) % 10
    if fill is None:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    else:
        images = fill.view(1, 3, 1, 1).expand(n, 3, 32, 32).clone()
    return CifarSplit(images, labels, CLASSES, spec)


def batch_ids(loader: BatchLoader) -> list[int]:
    """All labels the loader yields, in order (tests set label = image index)."""
    ids = []
    for _, labels in loader:
        ids.extend(labels.tolist())
    return ids


def test_train_shards_are_disjoint_and_equal():
    n = 203  # ragged: not divisible by the world size
    split = make_split(n)
    split.labels = torch.arange(n)  # label = index, so the batches reveal which images they hold
    seen = []
    for rank in range(2):
        loader = BatchLoader(split, 10, train=True, seed=4, shard=(rank, 2))
        loader.set_epoch(3)
        seen.append(batch_ids(loader))
    assert len(seen[0]) == len(seen[1]) == 100  # 101 per rank, 10 full batches
    assert not set(seen[0]) & set(seen[1])
    # same epoch -> same order; next epoch -> a new permutation
    loader = BatchLoader(split, 10, train=True, seed=4, shard=(0, 2))
    loader.set_epoch(3)
    assert batch_ids(loader) == seen[0]
    loader.set_epoch(4)
    assert batch_ids(loader) != seen[0]


def test_eval_shards_cover_every_image_once():
    split = make_split(23)
    split.labels = torch.arange(23)
    a = batch_ids(BatchLoader(split, 5, train=False, shard=(0, 2)))
    b = batch_ids(BatchLoader(split, 5, train=False, shard=(1, 2)))
    assert sorted(a + b) == list(range(23))
    assert batch_ids(BatchLoader(split, 5, train=False)) == list(range(23))
    assert len(BatchLoader(split, 5, train=False)) == 5  # last batch partial, kept


def test_normalization_of_the_mean_image_is_zero():
    spec = dataset_spec("cifar10")
    mean = torch.tensor(spec.mean)
    split = make_split(20, fill=torch.round(mean * 255).to(torch.uint8))
    images, _ = next(iter(BatchLoader(split, 20, train=False)))
    assert images.dtype == torch.float32 and images.shape == (20, 3, 32, 32)
    assert images.abs().max() < 0.01  # rounding to uint8 leaves < 0.5/255/std
    one_std = torch.round((mean + torch.tensor(spec.std)) * 255).to(torch.uint8)
    images, _ = next(iter(BatchLoader(make_split(4, fill=one_std), 4, train=False, channels_last=True)))
    assert torch.allclose(images, torch.ones_like(images), atol=0.01)
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_augmented_batches_keep_labels_aligned():
    n = 40
    labels = torch.arange(n) % 10
    images = (labels * 20 + 10).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    split = CifarSplit(images, labels, CLASSES, dataset_spec("cifar10"))
    spec = split.spec
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    for x, y in BatchLoader(split, 8, train=True, seed=2):
        raw = torch.round((x * std + mean) * 255)
        centre = raw[:, :, 4:28, 4:28]  # never touched by the zero padding of a 4-pixel crop
        assert torch.equal(centre, (y * 20 + 10).float().view(-1, 1, 1, 1).expand_as(centre))
        assert (raw == 0).any()  # padding shows up at the borders
