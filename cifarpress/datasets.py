"""The CIFAR datasets' fixed facts: folders, archives, md5 sums, class counts, normalization.

Kept free of torch so the recipe schema and the command line's help load fast."""
from __future__ import annotations

from dataclasses import dataclass

from cifarpress.errors import CifarpressError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    url: str
    md5: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise CifarpressError(
            f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}"
        ) from None
