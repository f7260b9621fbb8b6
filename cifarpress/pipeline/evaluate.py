"""Top-1 of a model file or an exported ONNX on the test split, with the honest absolute figure beside it."""
from __future__ import annotations

import numpy as np

from cifarpress.data import CifarSplit, check_classes, describe_split, load_split


def accuracy_summary(model: str, test: CifarSplit, correct, graph_correct=None) -> dict:
    """Top-1 on the whole test split, and on its official images alone where the build mixes sources (with
    the binomial standard error, about 1 pp on 1000 images): the honest absolute figure."""
    result = {"model": model, "top1": round(100 * float(np.mean(correct)), 3), "test_set": describe_split(test)}
    if graph_correct is not None:
        result["top1_graph"] = round(100 * float(np.mean(graph_correct)), 3)
    official = test.official_prefix
    if 0 < official < len(test):
        p = float(np.mean(correct[:official]))
        result[f"top1_images_0_{official - 1}_official"] = round(100 * p, 2)
        result["standard_error_pp"] = round(100 * (p * (1 - p) / official) ** 0.5, 2)
    return result


def evaluate_file(checkpoint: str, dataset: str | None = None, data_root=None, arch: str | None = None,
                  num_classes: int | None = None, threads: int | None = None) -> dict:
    """accuracy_summary of a model file (PyTorch) or an .onnx (onnxruntime; a QDQ file also in its own math)."""
    if checkpoint.endswith(".onnx"):
        from cifarpress.runtime.onnx_file import read_onnx_metadata
        from cifarpress.runtime.ort import is_quantized_graph, onnx_predictions

        meta = read_onnx_metadata(checkpoint)
        test = load_split(dataset or meta.get("dataset", "cifar10"), "test", data_root)
        correct = onnx_predictions(checkpoint, test.images, threads) == test.labels.numpy()
        graph = (onnx_predictions(checkpoint, test.images, threads, exact=True) == test.labels.numpy()
                 if is_quantized_graph(checkpoint) else None)
    else:
        from cifarpress.model_file import load_model
        from cifarpress.train.trainer import predict

        model, info = load_model(checkpoint, arch, num_classes)
        test = load_split(dataset or info["dataset"] or "cifar10", "test", data_root)
        check_classes(info["num_classes"], test)
        correct, graph = (predict(model, test) == test.labels).numpy(), None
    return accuracy_summary(checkpoint, test, correct, graph)
