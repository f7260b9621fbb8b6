"""Device side: the exact CIFAR-10 training set rebuilt from the WebP sheets carried in two calls.

    python3 bench/device/unpack.py A   sheets 0-24 and test images 0-999 -> runs/device-data/ (kept between calls)
    python3 bench/device/unpack.py B   sheets 25-49 joined to them -> data/cifar-10-batches-py (test batch: the
                                       official images 0-999), checked against the official pixels' digest
"""
import hashlib
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# sha256 of data_batch_1..5's b"data" arrays, one after another, as build_cifar10.py --train exact writes them
TRAIN_SHA256 = "9d5c2eddadb0deff02c14c350c0385aab7b1d5ff1edfeb4997c8dc8644960111"
TEST_SHA256 = "f167149948fc8fe0b9a76ba86421e987817f98b63761ba9415c5d42664d51f03"  # official test images 0-999
KEEP = Path("runs/device-data")  # runs/ is in .gitignore: the device keeps it between warm calls
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def planar(images: np.ndarray) -> np.ndarray:  # [N, 32, 32, 3] -> [N, 3072], channel-planar like CIFAR's files
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def sheets(folder: Path, ids) -> np.ndarray:
    out = []
    for i in ids:
        tiles = np.asarray(Image.open(folder / f"sheet_{i:02d}.webp").convert("RGB"))  # [800, 1280, 3]
        out.append(planar(tiles.reshape(25, 32, 40, 32, 3).transpose(0, 2, 1, 3, 4).reshape(1000, 32, 32, 3)))
    return np.concatenate(out)


def labels(folder: Path) -> np.ndarray:
    text = (folder / "cifar10_labels.js").read_text()
    return np.array(json.loads(re.search(r"\[.*\]", text, re.S).group(0)), dtype=np.int64)


def write_batch(path: Path, title: str, data: np.ndarray, labels_: np.ndarray, names: list) -> None:
    batch = {b"batch_label": title.encode(), b"labels": labels_.tolist(), b"data": np.ascontiguousarray(data),
             b"filenames": names}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=4)


if sys.argv[1:] == ["A"]:
    KEEP.mkdir(parents=True, exist_ok=True)
    test = planar(np.asarray(Image.open(".device-data/A/cifar10_batch_50.png").convert("RGB")).reshape(1000, 32, 32, 3))
    if hashlib.sha256(test.tobytes()).hexdigest() != TEST_SHA256:
        raise SystemExit("test images 0-999 differ from the official pixels")
    np.save(KEEP / "test1000.npy", test)
    np.save(KEEP / "trainA.npy", sheets(Path(".device-data/A"), range(25)))
    print("half A kept in", KEEP)
elif sys.argv[1:] == ["B"]:
    if not (KEEP / "trainA.npy").is_file():
        raise SystemExit(f"{KEEP}/trainA.npy is missing: the machine went cold after call A; run call A again")
    train = np.concatenate([np.load(KEEP / "trainA.npy"), sheets(Path(".device-data/B"), range(25, 50))])
    if hashlib.sha256(train.tobytes()).hexdigest() != TRAIN_SHA256:
        raise SystemExit("the rebuilt training images differ from the official pixels")
    y = labels(Path(".device-data/B"))
    out = Path("data/cifar-10-batches-py")
    out.mkdir(parents=True, exist_ok=True)
    for b in range(5):
        s = slice(b * 10000, (b + 1) * 10000)
        write_batch(out / f"data_batch_{b + 1}", f"training batch {b + 1} of 5", train[s], y[s],
                    [f"train_{k:05d}.png".encode() for k in range(s.start, s.stop)])
    write_batch(out / "test_batch", "testing batch 1 of 1 (official images 0-999 only)",
                np.load(KEEP / "test1000.npy"), y[50000:], [f"test_{k:05d}.png".encode() for k in range(1000)])
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000,
                     b"num_vis": 3072}, f, protocol=4)
    print("exact CIFAR-10 in", out)
else:
    raise SystemExit("usage: unpack.py A|B")
