"""CIFAR-10/100 from their canonical python layouts, held in memory as uint8.

Augmentation (pad-4 random crop, horizontal flip) and normalization run on
whole batches as tensor ops, so a batch costs about a millisecond on one core
and the loader never starves the model (see bench/data_pipeline.py).
"""
from __future__ import annotations

import collections.abc
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cifarpress.datasets import DATASETS, DatasetSpec, custom_spec, dataset_spec  # noqa: F401 (re-exported: the data API)
from cifarpress.errors import CifarpressError

ENV_VAR = "CIFARPRESS_DATA"


def default_data_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarpress"


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """--data-root wins, then $CIFARPRESS_DATA, then the user cache."""
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return default_data_root()


# What the build script (../shared/data/build_cifar10.py, its `.built-with` stamp) put in each split.
_BUILD_SOURCES = {
    "train": {"exact": "official pixels", "jpeg": "a JPEG re-encoding (~30 dB)"},
    "test": {"exact1000": "images 0-999 only, official pixels", "mixed": "images 0-999 official, 1000-9999 JPEG",
             "jpeg": "a JPEG re-encoding (~30 dB)"},
}
OFFICIAL_TEST_IMAGES = 1000  # how many leading test images are the official pixels in a --test mixed build


@dataclass
class CifarSplit:
    """Images held in memory: a CIFAR split (uint8 [N, 3, 32, 32]), or a sample of a user's data held as the
    exported graph takes it (float [N, C, H, W]: the model's inputs, or pixels where the graph normalizes)."""

    images: torch.Tensor  # uint8 [N, 3, 32, 32], or float [N, C, H, W] graph inputs
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    spec: DatasetSpec
    source: str = ""  # where the pixels came from, in words (describe_source)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "CifarSplit":
        return CifarSplit(self.images[indices], self.labels[indices], self.classes, self.spec,
                          f"{len(indices)} images of {self.source or 'the split'}")

    def pixels(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The images (or those at `indices`) as float graph inputs: uint8 scaled to [0, 1], float as held."""
        images = self.images if indices is None else self.images[indices]
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    @property
    def official_prefix(self) -> int:
        """How many leading images are the official pixels (0 when unknown or JPEG)."""
        if "images 0-999 official" in self.source or "images 0-999 only, official" in self.source:
            return min(OFFICIAL_TEST_IMAGES, len(self))
        return len(self) if self.source.startswith("official") else 0


def describe_source(folder: Path, split: str) -> str:
    """The pixels' origin in words: the build stamp of a local copy, else the official files."""
    stamp = folder / ".built-with"
    if not stamp.exists():
        return "official files"
    options = dict(part.split("=", 1) for part in stamp.read_text().split() if "=" in part)
    kind = options.get(split, "jpeg")
    return _BUILD_SOURCES[split].get(kind, kind) + f"; local build {split}={kind}"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(spec: DatasetSpec, root: Path, why: str) -> str:
    return (
        f"{spec.name} not found in {root / spec.folder} and {why}; pass --data-root DIR "
        f"or set {ENV_VAR} to the folder that holds {spec.folder}"
    )


def download(spec: DatasetSpec, root: Path, url: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch the official archive, check its md5, unpack it into root."""
    url = url or spec.url
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / Path(url).name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as exc:
            raise CifarpressError(_missing_message(spec, root, f"downloading {url} failed ({exc})")) from None
        got = _md5(archive)
        if got != spec.md5:
            raise CifarpressError(
                f"downloaded {url} has md5 {got}, expected {spec.md5}; delete it and retry, "
                f"or pass --data-root DIR with a verified copy"
            )
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        target = root / spec.folder
        if target.exists():
            shutil.rmtree(target)
        # Move into place in one rename so an interrupted unpack never looks complete.
        os.replace(Path(tmp) / spec.folder, target)
    return target


class _DataOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; allow only what they hold (dicts, lists, bytes, numpy arrays), so a
    planted batch file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which a data batch never holds")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise CifarpressError(f"cannot read {path} ({exc}); delete the folder and download again") from None


def load_split(
    dataset: str = "cifar10",
    split: str = "train",
    data_root: str | os.PathLike | None = None,
    download_if_missing: bool = True,
) -> CifarSplit:
    """Load one split ('train' or 'test') as uint8 NCHW tensors.

    Missing files are downloaded into the data root unless `download_if_missing`
    is False or the environment sets CIFARPRESS_NO_DOWNLOAD=1 (offline machines,
    tests); then a CifarpressError says where the data was looked for.
    """
    spec = dataset_spec(dataset)
    if split not in ("train", "test"):
        raise CifarpressError(f"unknown split '{split}'; use 'train' or 'test'")
    root = resolve_data_root(data_root)
    folder = root / spec.folder
    files = spec.train_files if split == "train" else spec.test_files
    needed = [folder / name for name in files + (spec.meta_file,)]
    if not all(p.exists() for p in needed):
        if not download_if_missing:
            raise CifarpressError(_missing_message(spec, root, "download is off"))
        if os.environ.get("CIFARPRESS_NO_DOWNLOAD", "").strip().lower() not in ("", "0", "false", "no"):
            raise CifarpressError(_missing_message(spec, root, "download is off (CIFARPRESS_NO_DOWNLOAD is set)"))
        download(spec, root)
    data, labels = [], []
    for name in files:
        batch = _read_pickle(folder / name)
        data.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[spec.label_key])
    meta = _read_pickle(folder / spec.meta_file)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec.names_key]]
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    if len(images) != len(labels) or len(images) == 0:
        raise CifarpressError(f"{folder}: the {split} batches hold {len(images)} images but {len(labels)} labels; "
                              f"rebuild or download the data again")
    source = describe_source(folder, split)
    if spec.name != "cifar10" and source != "official files":
        source = "local files"
    return CifarSplit(images, torch.tensor(labels, dtype=torch.int64), classes, spec, source)


def describe_split(split: CifarSplit) -> str:
    """One line on what was loaded: 'CIFAR-10 test: 10,000 images (images 0-999 official, 1000-9999 JPEG ...)'."""
    return f"{split.spec.name} {len(split):,} images ({split.source or 'unknown source'})"


def balanced_subset(labels: torch.Tensor, total: int, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed, class-balanced subset of `total` images (sorted).

    A class with fewer images than its share gives all it has and the shortfall
    is drawn from the other classes, so the subset always holds `total` images.
    """
    classes = int(labels.max()) + 1
    if total < classes or total > len(labels):
        raise CifarpressError(f"subset size {total} must lie between {classes} and {len(labels)}")
    gen = torch.Generator().manual_seed(seed)
    base, extra = divmod(total, classes)
    picked, spare = [], []
    for c in range(classes):
        members = torch.nonzero(labels == c).flatten()
        want = base + (1 if c < extra else 0)
        shuffled = members[torch.randperm(len(members), generator=gen)]
        picked.append(shuffled[:want])
        spare.append(shuffled[want:])
    chosen = torch.cat(picked)
    short = total - len(chosen)
    if short:
        rest = torch.cat(spare)
        chosen = torch.cat([chosen, rest[torch.randperm(len(rest), generator=gen)[:short]]])
    return chosen.sort().values


def random_crop_flip(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-`pad` random crop and horizontal flip of a uint8 batch, vectorized."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class Normalizer:
    """uint8 NCHW -> float32, (x/255 - mean) / std; float NCHW (graph inputs, see CifarSplit) -> (x - mean) / std."""

    def __init__(self, mean, std, device="cpu", channels_last: bool = False):
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(device)
        self.inv_std = (1.0 / std).to(device)
        self.shift = (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std).to(device)
        self.device = device
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        x = x.float() * (self.scale if x.dtype == torch.uint8 else self.inv_std) - self.shift
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class BatchLoader:
    """Iterates over (normalized images, labels) batches of an in-memory split.

    With `shard=(rank, world)` every process sees a disjoint slice of the same
    per-epoch permutation, which is what DistributedDataParallel needs.
    """

    def __init__(
        self,
        split: CifarSplit,
        batch_size: int,
        train: bool,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ):
        self.split = split
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank, self.world = shard
        self.epoch = 0
        self.normalize = Normalizer(split.spec.mean, split.spec.std, device, channels_last)
        self.device = device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.split)
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
            # Equal shard sizes keep DDP ranks in lock-step; drop the ragged tail.
            per_rank = n // self.world
            return order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return torch.arange(n)[self.rank::self.world]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()
        gen = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch + 1)
        for b in range(len(self)):
            idx = indices[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.split.images[idx]
            if self.train:
                images = random_crop_flip(images, gen)
            yield self.normalize(images), self.split.labels[idx].to(self.device, non_blocking=True)


def check_classes(num_classes: int, split: CifarSplit) -> None:
    if num_classes != split.spec.num_classes:
        raise CifarpressError(
            f"the model has {num_classes} outputs but {split.spec.name} has {split.spec.num_classes} classes; "
            f"pass the matching --dataset")


# -- a user's own data ----------------------------------------------------------------------

def batch_pair(batch, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) out of one batch of a user's data (a DataLoader yields [images, labels])."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(t, torch.Tensor) for t in batch[:2]):
        return batch[0], batch[1]
    shown = type(batch).__name__ if not isinstance(batch, torch.Tensor) else f"a tensor of shape {tuple(batch.shape)}"
    raise CifarpressError(f"{what}: a batch is {shown}, not (images, labels); give a DataLoader or an iterable "
                          f"of (images, labels) tensor pairs")


def check_reiterable(data, what: str = "data") -> None:
    """A training loader is read once per epoch (and once more for its shape): a generator would run dry.
    (An iterator, not iter(data) is data, so a DataLoader's workers are not started just to ask.)"""
    if isinstance(data, collections.abc.Iterator):
        raise CifarpressError(f"{what} is a one-shot iterator; pass something that can be read again, such as a "
                              f"DataLoader or a list of batches")


class LoaderBatches:
    """A user's data as the Trainer and `evaluate` iterate it: any re-iterable of (images, labels) batches,
    such as a DataLoader with its own transforms, shuffling and batch size, moved to the device as it comes.

    Its images are the model's inputs as they are (no normalization or augmentation is added). Under torchrun
    every rank reads the whole loader unless the user shards it (a DistributedSampler, whose set_epoch is called)."""

    def __init__(self, data, device: str | torch.device = "cpu", channels_last: bool = False, what: str = "data"):
        check_reiterable(data, what)
        self.data, self.device, self.channels_last, self.what = data, device, channels_last, what

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        try:
            return len(self.data)
        except TypeError:
            raise CifarpressError(f"{self.what} has no length, so the run's steps are unknown; pass a DataLoader "
                                  f"or a list, or set max_steps_per_epoch") from None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.data:
            images, labels = batch_pair(batch, self.what)
            images = images.to(self.device, non_blocking=True)
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)


def as_batches(data, batch_size: int, train: bool, seed: int = 0, shard: tuple[int, int] = (0, 1),
               device: str | torch.device = "cpu", channels_last: bool = False, what: str = "data"):
    """The batches to iterate: a CIFAR split through BatchLoader (augmented when training), anything else as
    the user's own (images, labels) batches (LoaderBatches; batch_size and seed are then the loader's own)."""
    if isinstance(data, CifarSplit):
        return BatchLoader(data, batch_size, train=train, seed=seed, shard=shard, device=device,
                           channels_last=channels_last)
    return LoaderBatches(data, device, channels_last, what)


def input_shape_of(data, what: str = "data") -> tuple[int, ...]:
    """One image's shape (C, H, W) as the model takes it: a split's, or the first batch's of a user's data."""
    if isinstance(data, CifarSplit):
        return tuple(data.images.shape[1:])
    check_reiterable(data, what)
    for batch in data:
        images, _ = batch_pair(batch, what)
        return tuple(images.shape[1:])
    raise CifarpressError(f"{what} yields no batches")
