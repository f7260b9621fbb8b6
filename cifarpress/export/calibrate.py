"""Post-training calibration: which images, which activation ranges, and how to turn a range into a scale.

Manifests. A calibration set is a class-balanced list of training-split indices
saved as JSON, so two runs (or two machines) calibrate on the same images.
`python -m cifarpress.export.calibrate --write-manifests calibration/` writes the
shipped ones (cifar10-train-512.json and cifar10-train-2048.json).

Observers. Ranges are collected in onnxruntime on the exported float graph (the
one that will be quantized), with every tensor that gets a QuantizeLinear added
as an extra graph output. That sees exactly the tensors the QDQ graph quantizes,
with BN already folded, and the normalization inside the graph. Two passes over
the images: the first finds each tensor's absmax, the second fills a 2048-bin
histogram of |x| over [0, absmax]. Exact zeros (half of every post-ReLU tensor)
are counted apart: any symmetric scale represents them exactly, so they say
nothing about where to clip.

Calibrators turn one histogram into a clipping threshold T; the symmetric int8
scale is T / 127 (zero point 0, as TensorRT wants):
  minmax      T = max |x|
  percentile  T = the 99.99th percentile of |x| (zeros included)
  entropy     TensorRT's: the T whose 128-level quantized histogram is closest to
              the clipped reference in KL divergence, T >= 128 bins
  mse         the T that minimizes the expected squared quantization error
              (rounding inside [-T, T], clipping outside)

Data-free calibration (`synthesize_images`, ZeroQ, Cai et al. 2020): images
optimized so that the batch statistics at every BatchNorm input match the
layer's running mean and variance, then calibrated on like real ones.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from cifarpress.data import CifarSplit, DatasetSpec, balanced_subset, load_split
from cifarpress.errors import CifarpressError
from cifarpress.utils.io import atomic_write_json
from cifarpress.utils.modules import unwrap
from cifarpress.utils.progress import progress

INT8_MAX = 127
HISTOGRAM_BINS = 2048
ENTROPY_LEVELS = 128  # quantized bins in the KL search (TensorRT's choice)
DEFAULT_PERCENTILE = 99.99
MANIFEST_COUNTS = (512, 2048)
MANIFEST_KEYS = ("dataset", "split", "count", "seed", "indices")


# -- manifests ------------------------------------------------------------------------

def calibration_manifest(dataset: str, labels: torch.Tensor, count: int, seed: int = 0) -> dict:
    """A class-balanced draw of `count` indices from the training split whose labels are `labels`."""
    indices = balanced_subset(labels, count, seed)
    return {"dataset": dataset, "split": "train", "count": count, "seed": seed,
            "indices": [int(i) for i in indices]}


def manifest_filename(dataset: str, count: int) -> str:
    return f"{dataset}-train-{count}.json"


def save_manifest(manifest: dict, path: str | Path) -> Path:
    _validate_manifest(manifest, str(path))
    return atomic_write_json(path, manifest)


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CifarpressError(f"calibration manifest {path} not found; write one with "
                              f"`python -m cifarpress.export.calibrate --write-manifests {path.parent}`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise CifarpressError(f"calibration manifest {path} is not valid JSON ({exc})") from None
    _validate_manifest(manifest, str(path))
    return manifest


def _validate_manifest(manifest: dict, where: str) -> None:
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CifarpressError(f"calibration manifest {where} lacks {', '.join(missing)}")
    if manifest["split"] != "train":
        raise CifarpressError(f"calibration manifest {where} draws from '{manifest['split']}'; calibrate on the "
                              f"training split so the test set stays unseen")
    indices = manifest["indices"]
    if len(indices) != manifest["count"] or len(set(indices)) != len(indices) or min(indices, default=0) < 0:
        raise CifarpressError(f"calibration manifest {where} must list {manifest['count']} distinct indices >= 0")


def manifest_images(manifest: dict, split: CifarSplit) -> torch.Tensor:
    """The manifest's images (uint8 NCHW) out of the training split it was drawn from."""
    if manifest["dataset"] != split.spec.name:
        raise CifarpressError(f"the manifest is for {manifest['dataset']}, the split is {split.spec.name}")
    indices = torch.tensor(manifest["indices"], dtype=torch.int64)
    if int(indices.max()) >= len(split):
        raise CifarpressError(f"the manifest indexes image {int(indices.max())} but the training split holds "
                              f"{len(split)}; was it written for another copy of {split.spec.name}?")
    return split.images[indices]


def write_default_manifests(folder: str | Path, dataset: str = "cifar10", counts=MANIFEST_COUNTS, seed: int = 0,
                            data_root=None) -> list[Path]:
    labels = load_split(dataset, "train", data_root).labels
    return [save_manifest(calibration_manifest(dataset, labels, count, seed),
                          Path(folder) / manifest_filename(dataset, count)) for count in counts]


# -- observed statistics -----------------------------------------------------------------

@dataclass
class AbsHistogram:
    """Histogram of |x| over [0, absmax]: `counts` holds the non-zero values, `zeros` the exact zeros."""
    absmax: float
    counts: np.ndarray = field(repr=False)
    zeros: int = 0

    @classmethod
    def empty(cls, absmax: float, bins: int = HISTOGRAM_BINS) -> AbsHistogram:
        return cls(float(absmax), np.zeros(bins, dtype=np.int64), 0)

    @classmethod
    def of(cls, values: np.ndarray, bins: int = HISTOGRAM_BINS) -> AbsHistogram:
        hist = cls.empty(float(np.abs(values).max(initial=0.0)), bins)
        hist.add(values)
        return hist

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def bin_width(self) -> float:
        return self.absmax / self.bins

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.zeros

    def add(self, values: np.ndarray) -> None:
        magnitude = np.abs(values, dtype=np.float32).ravel()
        nonzero = magnitude[magnitude > 0]
        self.zeros += magnitude.size - nonzero.size
        if nonzero.size == 0:
            return
        if self.absmax <= 0:
            raise CifarpressError("a histogram with range 0 got non-zero values; collect absmax first")
        index = np.minimum((nonzero * (self.bins / self.absmax)).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)


def collect_statistics(onnx_path: str | Path, tensors: list[str], pixels: np.ndarray, histograms: bool = True,
                       bins: int = HISTOGRAM_BINS, batch: int = 128, threads: int | None = None
                       ) -> dict[str, AbsHistogram]:
    """Run the float graph at `onnx_path` on `pixels` (float32 NCHW in [0, 1]) and observe `tensors`.

    With histograms=False only absmax is collected (all `minmax` needs), in one pass."""
    from cifarpress.runtime.onnx_file import INPUT_NAME
    from cifarpress.runtime.ort import make_session

    proto = onnx.load(str(onnx_path))
    graph_outputs = {o.name for o in proto.graph.output}
    produced = {o for node in proto.graph.node for o in node.output} | {i.name for i in proto.graph.input}
    unknown = [t for t in tensors if t not in produced]
    if unknown:
        raise CifarpressError(f"{onnx_path} has no tensors named {unknown[:3]}")
    for name in tensors:
        if name not in graph_outputs:
            proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as tmp:
        observed = Path(tmp) / "observed.onnx"
        onnx.save(proto, str(observed))
        session = make_session(observed, threads)

        def batches(what: str):
            for start in progress(range(0, len(pixels), batch), what=what):
                x = np.ascontiguousarray(pixels[start:start + batch], dtype=np.float32)
                yield session.run(tensors, {INPUT_NAME: x})

        absmax = dict.fromkeys(tensors, 0.0)
        for values in batches("calibration: ranges"):
            for name, value in zip(tensors, values):
                absmax[name] = max(absmax[name], float(np.abs(value).max(initial=0.0)))
        stats = {name: AbsHistogram.empty(absmax[name], bins if histograms else 1) for name in tensors}
        if histograms:
            for values in batches("calibration: histograms"):
                for name, value in zip(tensors, values):
                    stats[name].add(value)
    return stats


# -- calibrators: histogram -> clipping threshold -------------------------------------------

def minmax_threshold(hist: AbsHistogram) -> float:
    return hist.absmax


def percentile_threshold(hist: AbsHistogram, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Upper edge of the bin where the cumulative share of |x| (zeros included) reaches `percentile`."""
    total = hist.total
    if total == 0 or hist.absmax == 0:
        return hist.absmax
    target = percentile / 100.0 * total
    if target <= hist.zeros:
        return hist.bin_width
    cumulative = hist.zeros + np.cumsum(hist.counts)
    bin_index = int(np.searchsorted(cumulative, target - 1e-9))
    return min(hist.absmax, (bin_index + 1) * hist.bin_width)


def entropy_threshold(hist: AbsHistogram, levels: int = ENTROPY_LEVELS) -> float:
    """TensorRT's entropy calibration: min KL(P || Q) over thresholds of `levels`..bins bins.

    P is the histogram cut at i bins with the outliers beyond added to its last
    bin; Q spreads each of `levels` groups of P's bins evenly over the group's
    non-empty bins. All candidates at once, from cumulative sums: the KL splits
    into sum(p log p) minus, per group, (mass of p in the group) * log(q of the group).
    """
    h = hist.counts.astype(np.float64)
    n, bins = h.sum(), len(h)
    if n == 0 or bins <= levels:
        return hist.absmax
    cum = np.concatenate([[0.0], np.cumsum(h)])
    cum_nonempty = np.concatenate([[0], np.cumsum(h > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        cum_hlogh = np.concatenate([[0.0], np.cumsum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1)), 0.0))])
    i = np.arange(levels, bins + 1)  # candidate bin counts
    outliers = n - cum[i]
    last = h[i - 1] + outliers  # P's last bin
    # sum over P's bins of p log p, p = counts / n
    plogp = (cum_hlogh[i - 1] - cum[i - 1] * np.log(n)) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = plogp + np.where(last > 0, last / n * np.log(last / n), 0.0)
    j = np.arange(levels)
    start, stop = (j[None, :] * i[:, None]) // levels, ((j[None, :] + 1) * i[:, None]) // levels
    group_mass = cum[stop] - cum[start]  # counts without the outliers
    group_nonempty = (cum_nonempty[stop] - cum_nonempty[start]).astype(np.float64)
    # the last group also holds the outliers (P's nonzero pattern, as TensorRT)
    group_nonempty[:, -1] += (h[i - 1] == 0) & (outliers > 0)
    p_mass = group_mass.copy()
    p_mass[:, -1] += outliers
    kept = (n - outliers)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log(group_mass / (group_nonempty * kept))
        cross = np.where(p_mass > 0, p_mass / n * log_q, 0.0)
    kl = plogp - cross.sum(axis=1)
    # a group with P-mass but no Q-mass (outliers piled onto empty bins) has infinite divergence
    kl[~np.isfinite(kl)] = np.inf
    if not np.isfinite(kl).any():
        return hist.absmax
    return float(i[int(np.argmin(kl))] * hist.bin_width)


def mse_threshold(hist: AbsHistogram) -> float:
    """The T (a bin edge) minimizing E[(x - dequant(quant(x)))^2] over the non-zero |x|.

    Inside [0, T] the rounding error is step^2/12 for values above step/2 and x^2
    below it (they round to 0); beyond T it is the clipping error (x - T)^2.
    Values sit at their bin centres."""
    h = hist.counts.astype(np.float64)
    bins = len(h)
    if h.sum() == 0:
        return hist.absmax
    width = hist.bin_width
    centres = (np.arange(bins) + 0.5) * width
    cum = np.concatenate([[0.0], np.cumsum(h)])
    cum_x = np.concatenate([[0.0], np.cumsum(h * centres)])
    cum_x2 = np.concatenate([[0.0], np.cumsum(h * centres ** 2)])
    i = np.arange(1, bins + 1)
    threshold = i * width
    step = threshold / INT8_MAX
    below_half_step = np.minimum(np.searchsorted(centres, step / 2), i)  # bins that round to 0
    rounding = cum_x2[below_half_step] + (cum[i] - cum[below_half_step]) * step ** 2 / 12
    clipping = ((cum_x2[-1] - cum_x2[i]) - 2 * threshold * (cum_x[-1] - cum_x[i])
                + threshold ** 2 * (cum[-1] - cum[i]))
    return float(threshold[int(np.argmin(rounding + clipping))])


CALIBRATORS = {"minmax": minmax_threshold, "percentile": percentile_threshold,
               "entropy": entropy_threshold, "mse": mse_threshold}
DEFAULT_CALIBRATOR = "entropy"  # a float model's int8 export (AdaPT deploy mode has its own, fixed_point.py)


def calibrator_threshold(hist: AbsHistogram, calibrator: str) -> float:
    try:
        method = CALIBRATORS[calibrator]
    except KeyError:
        raise CifarpressError(f"unknown calibrator '{calibrator}'; choose one of {', '.join(CALIBRATORS)}") from None
    if calibrator != "minmax" and hist.total == 0 and hist.absmax > 0:
        raise CifarpressError(f"the {calibrator} calibrator needs histograms; collect_statistics(histograms=True)")
    return method(hist)


def activation_scale(threshold: float) -> float:
    """Symmetric int8 scale for a clipping threshold; an all-zero tensor gets 1/127 (any positive scale is exact)."""
    return float(np.float32(threshold if threshold > 0 else 1.0) / np.float32(INT8_MAX))


# -- data-free calibration (ZeroQ) ---------------------------------------------------------

@dataclass
class SyntheticImages:
    pixels: torch.Tensor  # float32 NCHW in [0, 1], the exported graph's input
    losses: list[float]   # BN-statistics loss at every step


def synthesize_images(model: nn.Module, spec: DatasetSpec, count: int = 64, steps: int = 300, lr: float = 0.2,
                      seed: int = 0) -> SyntheticImages:
    """ZeroQ's distilled data: images whose per-BN batch mean/std match the running statistics.

    Optimized in the model's normalized input space with Adam from Gaussian noise,
    and clamped to valid pixels after each step so the result is a real image."""
    model = unwrap(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise CifarpressError("zeroq needs a model with BatchNorm layers (their running statistics are the target)")
    was_training = model.training
    model.eval()
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *spec.input_shape, generator=gen).requires_grad_(True)
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for m in norms]
    optimizer = torch.optim.Adam([x], lr=lr)
    losses = []
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for _ in range(steps):
            inputs.clear()
            model(x)
            loss = sum(_bn_statistics_loss(a, m) for a, m in zip(inputs, norms))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            losses.append(float(loss.detach()))
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    pixels = (x.detach() * std + mean).clamp(0, 1)
    return SyntheticImages(pixels, losses)


def _bn_statistics_loss(activation: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    dims = [d for d in range(activation.dim()) if d != 1]
    batch_mean = activation.mean(dim=dims)
    batch_std = (activation.var(dim=dims, unbiased=False) + bn.eps).sqrt()
    return (torch.linalg.vector_norm(batch_mean - bn.running_mean)
            + torch.linalg.vector_norm(batch_std - (bn.running_var + bn.eps).sqrt()))


# -- python -m cifarpress.export.calibrate --------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifarpress.export.calibrate",
                                     description="Write the class-balanced calibration manifests.")
    parser.add_argument("--write-manifests", metavar="FOLDER", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--counts", default=",".join(str(c) for c in MANIFEST_COUNTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    try:
        paths = write_default_manifests(args.write_manifests, args.dataset, counts, args.seed, args.data_root)
    except CifarpressError as exc:
        raise SystemExit(f"error: {exc}") from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
