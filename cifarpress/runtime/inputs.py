"""What an exported file is fed: its declared preprocessing, and a user's batches turned into its inputs.

A cifarpress graph takes pixels in [0, 1] and normalizes inside (CIFAR: the model was trained on normalized
inputs), or, for a user's data whose own transform normalized it, the model's inputs as they are (its
preprocessing metadata says `"scale": "none"`). A user's loader yields the model's inputs either way, so
x * std + mean gives the graph's. A CIFAR split holds uint8 pixels and needs only the 1/255.
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import torch

from cifarpress.data import CifarSplit, batch_pair, check_reiterable


def normalization_of(meta: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) per channel, broadcastable over NCHW, of a graph that normalizes inside; None for one that
    takes the model's own inputs (or a file without the metadata, whose inputs are taken as given)."""
    raw = meta.get("preprocessing")
    try:
        preprocessing = json.loads(raw) if isinstance(raw, str) else (raw or {})
    except ValueError:
        return None
    if preprocessing.get("scale") == "none" or "mean" not in preprocessing:
        return None
    shape = (1, -1, 1, 1)
    return (np.asarray(preprocessing["mean"], np.float32).reshape(shape),
            np.asarray(preprocessing["std"], np.float32).reshape(shape))


def graph_inputs(images: torch.Tensor, normalization: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """One batch of a user's model inputs as the graph takes them (float32 NCHW)."""
    x = images.detach().cpu().float().numpy()
    if normalization is None:
        return x
    mean, std = normalization
    return (x * std + mean).astype(np.float32)


def labelled_batches(data, meta: dict, batch: int = 500) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(graph inputs, labels) batches of a CIFAR split (held as graph inputs already) or of a user's
    (images, labels) batches (the model's inputs, mapped through the file's preprocessing)."""
    if isinstance(data, CifarSplit):
        for start in range(0, len(data), batch):
            index = torch.arange(start, min(start + batch, len(data)))
            yield data.pixels(index).numpy(), data.labels[index].numpy()
        return
    check_reiterable(data, "evaluation data")
    normalization = normalization_of(meta)
    for item in data:
        images, labels = batch_pair(item, "evaluation data")
        yield graph_inputs(images, normalization), labels.detach().cpu().numpy()
