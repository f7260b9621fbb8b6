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
    input_shape: tuple[int, ...] = (3, 32, 32)  # one image as the model takes it (C, H, W)

    @property
    def normalizes(self) -> bool:
        """Whether an exported graph normalizes its input inside (mean 0 and std 1: it takes the model's own
        inputs as they are, as for a user's data whose transform already normalized them)."""
        return any(m != 0 for m in self.mean) or any(s != 1 for s in self.std)


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


def custom_spec(num_classes: int, input_shape: tuple[int, ...], mean=None, std=None,
                name: str = "custom") -> DatasetSpec:
    """The spec of a user's own data (no files): its class count and image shape, and the normalization an
    exported graph folds in (`mean`/`std` per channel; left out: none, the graph takes the model's inputs)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise CifarpressError(f"input_shape {tuple(input_shape)} is not one image's (C, H, W), e.g. (3, 64, 64)")
    channels = shape[0]
    mean = tuple(float(m) for m in mean) if mean is not None else (0.0,) * channels
    std = tuple(float(s) for s in std) if std is not None else (1.0,) * channels
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise CifarpressError(f"normalization needs {channels} means and {channels} positive stds (one per "
                              f"channel of {shape}), got mean {mean}, std {std}")
    return DatasetSpec(name=name, folder="", url="", md5="", num_classes=int(num_classes), mean=mean, std=std,
                       train_files=(), test_files=(), meta_file="", label_key=b"", names_key=b"", input_shape=shape)


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise CifarpressError(
            f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}"
        ) from None
