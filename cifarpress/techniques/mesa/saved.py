"""Where Mesa hooks into autograd: every tensor an op saves for backward passes through `pack`.

`torch.autograd.graph.saved_tensors_hooks` is PyTorch's supported hook point for this (its own
`save_on_cpu` is built on it), so every layer of any model is covered without replacing modules.
What is stored, and why:
- parameters, module buffers (BatchNorm's running statistics) and whatever a conv or linear op
  takes as its weight (a fake-quantized copy of a parameter, say) stay as they are: they are
  model-sized, not batch-sized, and a weight's error would reach every input gradient;
- integer and bool tensors (indices, masks) and tensors under `min_elements` stay as they are;
- every other floating tensor is stored as per-group 8-bit codes (packing.quantize);
- a tensor saved by two ops (a ReLU's output, saved by the ReLU and by the next conv) is stored once:
  the second save gets the first one's packed copy;
- with `relu_mask`, ReLU and ReLU6 run as `MaskedReLU`, which keeps a 1-bit mask of where gradient
  passes instead of its output (exact: that is all their backward reads). A torch function mode
  routes `F.relu`, `nn.ReLU`, `Tensor.relu_` and the rest to it, so models need not change.

`held_bytes` sums what the hooks store in one step: the bytes held for the backward pass, exact and
device-independent, counted the same way (once per tensor) when nothing is compressed.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cifarpress.techniques.mesa.packing import PackedMask, QuantizedTensor, dequantize, pack_mask, quantize, unpack_mask

WEIGHTED_OPS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
                torch.conv_transpose3d, F.linear}
# func -> (in place, upper clip): what each ReLU spelling computes.
RELU_OPS = {F.relu: (None, None), torch.relu: (False, None), torch.relu_: (True, None),
            torch.Tensor.relu: (False, None), torch.Tensor.relu_: (True, None), F.relu6: (None, 6.0)}


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


class MaskedReLU(torch.autograd.Function):
    """ReLU (or ReLU6 with `upper`) whose backward needs only a 1-bit mask, held on ctx."""

    @staticmethod
    def forward(ctx, x, inplace: bool, upper, store: "SavedActivationStore"):
        passes = x > 0 if upper is None else (x > 0) & (x < upper)  # where torch's own backward passes gradient
        ctx.mask = pack_mask(passes)
        store.held_bytes += ctx.mask.bits.numel()
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(min=0, max=upper)
        return x.clamp(min=0, max=upper)

    @staticmethod
    def backward(ctx, grad):
        mask: PackedMask = ctx.mask
        return grad * unpack_mask(mask), None, None, None


class _RouteOps(TorchFunctionMode):
    """Sees every torch call of the forward: notes conv/linear weights, sends ReLUs to MaskedReLU."""

    def __init__(self, store: "SavedActivationStore"):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in WEIGHTED_OPS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, torch.Tensor):
                self.store.weights.add(weight.untyped_storage().data_ptr())
        elif self.store.relu_mask and func in RELU_OPS and torch.is_grad_enabled():
            x = args[0]
            if isinstance(x, torch.Tensor) and x.requires_grad and x.dtype.is_floating_point:
                inplace, upper = RELU_OPS[func]
                if inplace is None:
                    inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
                return MaskedReLU.apply(x, inplace, upper, self.store)
        return func(*args, **kwargs)


class SavedActivationStore:
    """The pack/unpack hooks and their per-step bookkeeping. compress=False only measures (the plain arm)."""

    def __init__(self, group_size: int = 256, stochastic: bool = True, relu_mask: bool = True,
                 min_elements: int = 4096, compress: bool = True):
        self.group_size, self.stochastic, self.min_elements = group_size, stochastic, min_elements
        self.relu_mask = relu_mask and compress
        self.compress = compress
        self.generator: torch.Generator | None = None
        self.model_tensors: set[int] = set()  # storages of parameters and buffers
        self.weights: set[int] = set()  # storages used as conv/linear weights this step
        self._saved: dict[tuple, tuple] = {}  # key -> (weakref to the tensor, what was stored)
        self.held_bytes = 0

    def watch(self, model: nn.Module) -> None:
        self.model_tensors = {t.untyped_storage().data_ptr()
                              for t in [*model.parameters(), *model.buffers()]}

    def pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter):
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.model_tensors or ptr in self.weights:
            return t
        key = _key(t)
        earlier = self._saved.get(key)
        # The storage cannot have been freed and reused while the first tensor is alive, so a live match is it.
        if earlier is not None and earlier[0]() is not None:
            return earlier[1]
        if self.compress and t.dtype.is_floating_point and t.numel() >= self.min_elements:
            stored = quantize(t, self.group_size, self.stochastic, self.generator)
            self.held_bytes += stored.nbytes
        else:
            stored = t
            self.held_bytes += t.numel() * t.element_size()
        self._saved[key] = (weakref.ref(t), stored)
        return stored

    @staticmethod
    def unpack(stored):
        return dequantize(stored) if isinstance(stored, QuantizedTensor) else stored

    def step(self):
        """A context for one forward: the hooks and the op router; bookkeeping starts afresh."""
        self.held_bytes = 0
        self.weights.clear()
        self._saved.clear()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
        stack.enter_context(_RouteOps(self))
        stack.callback(self._saved.clear)  # the graph holds what backward needs; drop the lookup table
        return stack
