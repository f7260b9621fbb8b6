"""AdaPT's precision-switching rules (Kummer et al., arXiv 2107.13490) as plain functions.

A layer holds its weights in fixed point <WL, FL>: WL-bit symmetric codes times the step
2^-FL (fake_quant.py's fixed-point rule). Every lookback window the rules move each layer:

PushDown ("no information loss"): lower FL, then WL, as far as quantizing the
    full-precision master weights loses no information: the R-bin histogram of the
    quantized copy equals that of the weights, KL(P || Q) = 0, up to a tolerance. The
    default tolerance is the histogram's sampling floor (R - 1) / 2N nats, the KL that an
    R-bin histogram of N weights shows against their own distribution by sampling alone
    (E[KL(P_hat || P)] to first order): a smaller difference is not information the test
    can see. A literal 0 asks every one of N weights to stay inside its bin, which forces
    steps below about range / N (ResNet-20: 20-32-bit words where the paper reports
    14-22). Both histograms span the range of both tensors, so a clipped weight is a
    loss too. Each bound is found by bisection that evaluates the midpoint, assuming the
    loss only grows as FL falls (a coarser grid, at a word wide enough not to clip) and as
    WL falls at a fixed FL (more clipping).
PushUp (vanishing-gradient guard): with the gradient diversity of the window,
    GD = sum |g_i| / |sum g_i| over unit-normalized gradients, and t = ln GD - 1 > 0,
    FL rises by s1 = ceil(1/t^2), s2 = ceil(32 t^2) - FL, or their mean or max
    (the strategy), then WL = max(WL, FL) + 1.
Result buffer: WL >= FL + RB (none when RB = 0), words within [min_bits, max_bits].
The lookback follows GD (max_lookback / GD, clamped, with momentum) and the histogram
resolution follows the lookback (one bin more at the longest window, one fewer at the
shortest); the strategy escalates min -> mean -> max while the training loss plateaus
(a window's mean no lower than the window before) and returns to min when it improves.

Two defects of the reference code (lorenz0890/AdaPT, optimizers/msgd_fp.py) are not carried
over: its "KL" passed probabilities where PyTorch's KLDivLoss wants log-probabilities (so a
difference could score <= 0 and pass as no loss), and its FL search tested the lower bound
instead of the midpoint. The histogram test here uses round-to-nearest, the codes a deployed
layer holds, so it is deterministic; training may still round stochastically.
"""
from __future__ import annotations

import math

import torch

from cifarpress.techniques.quantize.fake_quant import MAX_FRAC_BITS, fixed_point_round, qmax_for

STRATEGIES = ("min", "mean", "max")


fixed_point = fixed_point_round  # the deployed codes, as the layer rounds them


def information_loss(w: torch.Tensor, w_hat: torch.Tensor, bins: int) -> float:
    """KL(P || Q) in nats between the `bins`-bin histograms of `w` (P) and of its quantized copy (Q).

    Both histograms span [min, max] of the two tensors together, so nothing falls outside. inf where Q
    leaves a bin empty that P fills. Exactly 0.0 when the histograms are equal.
    """
    w, w_hat = w.detach().flatten().double(), w_hat.detach().flatten().double()
    low, high = float(torch.minimum(w.min(), w_hat.min())), float(torch.maximum(w.max(), w_hat.max()))
    if high <= low:
        return 0.0
    p = torch.histc(w, bins, low, high)
    q = torch.histc(w_hat, bins, low, high)
    if torch.equal(p, q):
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    filled = p > 0
    if bool((q[filled] == 0).any()):
        return math.inf
    return max(0.0, float((p[filled] * (p[filled].log() - q[filled].log())).sum()))


SAMPLING = "sampling"  # the tolerance that is each tensor's histogram sampling floor


def sampling_floor(count: int, bins: int) -> float:
    """(bins - 1) / 2N nats: the expected KL of an N-sample, `bins`-bin histogram against its own distribution."""
    return (bins - 1) / (2.0 * max(count, 1))


def tolerance_for(w: torch.Tensor, bins: int, tolerance: float | str, floored: bool = False) -> float:
    """The KL that still counts as no loss for w; floored: never below w's sampling floor (a KL the histogram's
    own noise explains is no evidence of loss, which a fixed tolerance would hold against small tensors)."""
    floor = sampling_floor(w.numel(), bins)
    if tolerance == SAMPLING:
        return floor
    return max(float(tolerance), floor) if floored else float(tolerance)


def lossless(w: torch.Tensor, word_bits: int, frac_bits: int, bins: int, tolerance: float | str = 0.0) -> bool:
    return information_loss(w, fixed_point(w, word_bits, frac_bits), bins) <= tolerance_for(w, bins, tolerance)


def _smallest(low: int, high: int, passes) -> int:
    """The smallest value in [low, high] that passes, by bisection at the midpoint (`high` if none below it do;
    the caller knows whether `high` itself passes)."""
    while low < high:
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid + 1
    return high


def enforce_buffer(word_bits: int, frac_bits: int, buffer_bits: int, min_bits: int,
                   max_bits: int) -> tuple[int, int]:
    """Keep WL >= FL + RB inside [min_bits, max_bits]: FL gives way when the word cannot grow.

    RB = 0 is no buffer at all: a word may then be narrower than its fraction (<8, 9> holds |w| < 1/4),
    which is what lets small weights reach 8 bits at a fine step.
    """
    frac_bits = max(0, min(frac_bits, max_bits - buffer_bits))
    headroom = frac_bits + buffer_bits if buffer_bits else 0
    word_bits = min(max_bits, max(word_bits, headroom, min_bits))
    return word_bits, frac_bits


def push_down(w: torch.Tensor, word_bits: int, frac_bits: int, *, bins: int, tolerance: float | str,
              min_bits: int, max_bits: int, buffer_bits: int, floored: bool = False) -> tuple[int, int]:
    """The narrowest <WL, FL> at or below the current one that still loses no information (PushDown).

    FL first, at the current word; then WL, at the new FL, down to max(min_bits, FL + RB). When the
    current format itself loses information, it stays: only PushUp raises precision.
    """
    tolerance = tolerance_for(w, bins, tolerance, floored)
    if not lossless(w, word_bits, frac_bits, bins, tolerance):
        return enforce_buffer(word_bits, frac_bits, buffer_bits, min_bits, max_bits)
    frac_bits = _smallest(0, frac_bits, lambda f: lossless(w, word_bits, f, bins, tolerance))
    floor = min(word_bits, max(min_bits, frac_bits + buffer_bits if buffer_bits else 0))
    word_bits = _smallest(floor, word_bits, lambda b: lossless(w, b, frac_bits, bins, tolerance))
    return enforce_buffer(word_bits, frac_bits, buffer_bits, min_bits, max_bits)


def gradient_diversity(unit_gradient_sum: torch.Tensor, count: int) -> float:
    """GD = sum |g_i| / |sum g_i| of `count` unit-norm gradients (their norms sum to `count`): 1 when all point
    the same way, about sqrt(count) for random directions, inf when they cancel exactly."""
    if count == 0:
        return 1.0
    norm = float(unit_gradient_sum.norm())
    return count / norm if norm > 0 else math.inf


def push_up_amount(diversity: float, frac_bits: int, strategy: str) -> int:
    """How many fractional bits PushUp adds: 0 unless t = ln GD - 1 > 0."""
    if not (0 < diversity < math.inf):
        return 0
    t = math.log(diversity) - 1.0
    if t <= 0:
        return 0
    s1 = math.ceil(1.0 / (t * t))
    s2 = max(math.ceil(32.0 * t * t) - frac_bits, 0)
    if strategy == "min":
        return min(s1, s2)
    if strategy == "mean":
        return math.ceil((s1 + s2) / 2)
    return max(s1, s2)


def push_up(word_bits: int, frac_bits: int, diversity: float, strategy: str, *, buffer_bits: int, min_bits: int,
            max_bits: int) -> tuple[int, int]:
    step = push_up_amount(diversity, frac_bits, strategy)
    if step:
        frac_bits += step
        word_bits = max(word_bits, frac_bits) + 1
    return enforce_buffer(word_bits, frac_bits, buffer_bits, min_bits, max_bits)


def within_range(largest: float, word_bits: int, frac_bits: int) -> int:
    """The fractional length, lowered if needed so the largest |weight| fits the word (no clipping).

    PushUp adds FL faster than WL (FL + s, WL + 1), and at max_bits the word cannot grow at all, so without
    this guard it can eat the integer bits until the format clips, a loss PushDown then never leaves."""
    if largest <= 0:
        return frac_bits
    return max(0, min(frac_bits, math.floor(math.log2(qmax_for(word_bits) / largest))))


def next_lookback(diversity: float, lookback: int, min_lookback: int, max_lookback: int, momentum: float) -> int:
    """Diverse (noisy) gradients close the window sooner: max_lookback / GD, clamped, blended with momentum."""
    target = max_lookback if not (0 < diversity < math.inf) else min(max(max_lookback / diversity, min_lookback),
                                                                      max_lookback)
    return min(max(math.ceil(momentum * target + (1.0 - momentum) * lookback), min_lookback), max_lookback)


def next_resolution(lookback: int, resolution: int, min_lookback: int, max_lookback: int, min_resolution: int,
                    max_resolution: int) -> int:
    if lookback >= max_lookback:
        resolution += 1
    elif lookback <= min_lookback:
        resolution -= 1
    return min(max(resolution, min_resolution), max_resolution)


def next_strategy(strategy: str, recent_loss: float, previous_loss: float) -> str:
    """Escalate min -> mean -> max while the loss does not improve; back to min when it does."""
    if recent_loss < previous_loss:
        return "min"
    return STRATEGIES[min(STRATEGIES.index(strategy) + 1, len(STRATEGIES) - 1)]


def initial_format(w: torch.Tensor, max_bits: int, buffer_bits: int, min_bits: int) -> tuple[int, int]:
    """The widest word, with the finest step that does not clip the largest weight."""
    frac_bits = within_range(float(w.detach().abs().max()), max_bits, MAX_FRAC_BITS)
    return enforce_buffer(max_bits, frac_bits, buffer_bits, min_bits, max_bits)
