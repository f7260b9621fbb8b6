"""The channel-flow tracer behind zero-invariant group discovery (private to cifarpress.prune).

follow_channels traces a model with torch.fx, propagates shapes on an example input (they
tell a 1x1 global pool from a larger map before a flatten, and a linear on (batch, features)
from one on anything else), then walks the graph once, following channels along dim 1:

    - every tensor gets a Layout: the global channel id at each index of its dim 1;
    - channel spaces (see groups.py) are opened as their producers are met, and channels
      that must be cut together are coupled with union-find (the smaller id stays root);
    - every conv, linear and BatchNorm parameter, and BN buffer, is recorded with the
      channel owning each of its rows or columns, as a producer, buffer or consumer;
    - an op it cannot follow gets the spaces it touches marked with a reason and a message
      in `unsupported`; the network input and output spaces are marked too.

What it follows is listed in the tables below: leaf modules by exact type, and the functional
calls fx meets inside everything else (a fused BatchNorm + activation, a Linear subclass) by what
they compute. Tensors that are per channel but not zero where their channels are (a sigmoid's
output) are *shifted*: only a gate multiplying a stream may read them (squeeze-and-excitation),
and a conv reading one keeps its input channels. Grouped convs couple each group's inputs and
outputs (whole groups go) or each position across the groups (equal counts go), chunk couples the same position of its parts (they stay equal), and
torch.split or a channel slice at fixed sizes is refused: its literals would be stale after a cut.
permute/transpose move the channel dim: elementwise ops and an nn.Linear reading it as its last dim
follow it there (ConvNeXt's MLP on (B, H, W, C)); everything else refuses moved channels.
The result is raw: groups.py turns it into ZIGs and a GroupSet (a marked space blocks every
channel coupled to it) and warns about the unsupported ops. The tracer is kept apart from the
group structures so that each reads on its own. eval_mode lives here because shape
propagation needs it; groups re-exports it for surgery and the pruners.
"""
from __future__ import annotations

import builtins
import itertools
import math
import operator
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from cifarpress.errors import CifarpressError

Layout = tuple[int, ...]  # the global channel id at each index of a tensor's dim 1


def follow_channels(model: nn.Module, example_input: torch.Tensor | None = None) -> _ChannelFlow:
    """Trace `model`, propagate shapes on `example_input` and follow its channels through the graph.

    `example_input` defaults to two random 3x32x32 images on the model's device (two, not one:
    a BatchNorm traced in training mode needs more than one value per channel on a 1x1 map).
    The model is left as it was: fx bakes a non-leaf norm's `self.training` into the graph
    (timm's BatchNormAct2d calls F.batch_norm(..., training=True) in train mode), so running
    the trace would move running statistics; every buffer is put back afterwards. A model fx
    cannot trace, or one that fails on the example input, raises CifarpressError; ops that
    cannot be followed are only listed in the result's `unsupported`.
    """
    x = example_input if example_input is not None else _example_input(model)
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        graph_module = _trace(model)
        with eval_mode(model):  # the graph module shares the model's submodules
            try:
                ShapeProp(graph_module).propagate(x)
            except Exception as exc:
                raise CifarpressError(
                    f"running {type(model).__name__} on an input of shape {tuple(x.shape)} failed "
                    f"({_first_line(exc)}); give the prune stage data of the size the model expects "
                    "(input_shape= in the Python API)"
                ) from exc
    finally:
        with torch.no_grad():
            buffers = dict(model.named_buffers())
            for name, value in saved.items():
                buffers[name].copy_(value)
    flow = _ChannelFlow(model, graph_module)
    flow.run()
    return flow


@contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode and no grad for the block; every submodule's training flag is restored after."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise CifarpressError(
            f"torch.fx cannot trace {type(model).__name__} ({_first_line(exc)}), so its channel groups cannot be "
            "found; structured pruning needs a forward without data-dependent control flow"
        ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _example_input(model: nn.Module) -> torch.Tensor:
    # a private generator: finding groups must not move the caller's random stream
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = next((p for p in itertools.chain(model.parameters(), model.buffers()) if p.is_floating_point()), None)
    return x if first is None else x.to(first.device, first.dtype)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- what the tracer follows ------------------------------------------------------------------
# Leaf modules are matched by exact type: a torch subclass (a QAT conv) may compute something else
# from the same attributes. A user's subclass (timm's Linear, BatchNormAct2d) is not an fx leaf:
# fx traces through its forward to F.conv2d / F.linear / F.batch_norm on its own parameters, and
# those calls are followed by what they compute, whatever the module is called.

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_CALLS = {F.conv1d, F.conv2d, F.conv3d}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# f(0) == 0 and acts on each channel alone. Not Sigmoid, Softplus (f(0) != 0: see _SHIFTING) or Softmax.
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Tanh, nn.Softsign, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_ZERO_PRESERVING_CALLS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "detach",
}
# Per channel only on a batched (N, C, *spatial) input: on a 2-D (batch, features) tensor
# nn.MaxPool1d takes dim 0 for channels and pools across the features. Value: spatial dims.
_SPATIAL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
}
_SPATIAL_CALLS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}
# Per channel but f(0) != 0 ("shifted"): a zero channel stops being zero, so nothing may read it
# as a channel, except a gate multiplying a stream (SE: x * sigmoid(...)), which is zero where x is.
_SHIFTING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_SHIFTING_CALLS = {torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_", F.hardsigmoid, F.softplus, torch.exp, "exp"}
_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_CROSS_CHANNEL_NORM_CALLS = {F.layer_norm, F.group_norm, F.local_response_norm, F.normalize}
_ADD_CALLS = {operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, operator.isub, torch.sub,
              "sub", "sub_"}
_MUL_CALLS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV_CALLS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CAT_CALLS = {torch.cat, torch.concat, torch.concatenate}
# Moving the channel dim (ConvNeXt's MLP runs nn.Linear on (B, H, W, C) between two permutes) is followed for
# elementwise ops and for a Linear reading channels on the last dim; anything else wants them on dim 1.
_PERMUTE_CALLS = {torch.permute, "permute"}
_TRANSPOSE_CALLS = {torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims"}
_CHUNK_CALLS = {torch.chunk, "chunk"}
_SPLIT_CALLS = {torch.split, "split"}
_FLATTEN_CALLS = {torch.flatten, "flatten"}
_RESHAPE_CALLS = {torch.reshape, "reshape", "view"}
_REDUCE_CALLS = {torch.mean, "mean", torch.sum, "sum"}
_METADATA_CALLS = {"size", "dim", "numel"}
_METADATA_ATTRS = {"shape", "device", "dtype", "ndim", "is_cuda"}
_NORM_ACROSS = "normalizes across channels, so cutting one channel would change the others"


class _Unsupported(Exception):
    def __init__(self, why: str = "", layout: Layout | None = None):
        super().__init__(why)
        self.why = why
        self.layout = layout  # channels the op had already claimed, forbidden too


@dataclass
class _Space:
    name: str
    first: int           # global id of channel 0
    size: int
    reason: str | None = None

    @property
    def ids(self) -> range:
        return range(self.first, self.first + self.size)


class _ChannelFlow:
    """One pass over the graph giving every tensor a Layout, coupling channels with union-find,
    and recording which parameter rows and columns each channel owns.

    After run(): `spaces` (in graph order, with a reason where forbidden), `space_of`,
    `parent` (read through find), `roles` ((param, dim) -> (kind, channel ids)) and
    `unsupported` (one message per op given up on)."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule):
        self.graph = graph_module.graph
        self.modules = dict(graph_module.named_modules())
        self.sharing = _modules_sharing_parameters(model)
        self.shared_params = _aliased_parameters(model)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.owners = dict(model.named_modules())  # the fx graph module holds bare stand-ins for traced-through ones
        self.spaces: list[_Space] = []
        self.space_of: list[int] = []   # channel id -> index in self.spaces
        self.parent: list[int] = []     # union-find forest over channel ids
        self.layouts: dict[fx.Node, Layout] = {}
        self.parts: dict[fx.Node, list[Layout]] = {}  # a split's or chunk's tuple: each item's layout
        self.shifted: set[fx.Node] = set()  # per-channel tensors that are not zero where their channels are
        self.channel_dim: dict[fx.Node, int] = {}  # tensors whose channels are not on dim 1 (after a permute)
        self.attrs: dict[fx.Node, str] = {}  # get_attr node -> qualified parameter or buffer name
        self.roles: dict[tuple[str, int], tuple[str, list[int]]] = {}  # (param, dim) -> (kind, channel ids)
        self.module_spaces: dict[str, Layout] = {}
        self.opaque: dict[fx.Node, str] = {}  # given-up node -> what it was, for tuples that flow on
        self.unsupported: list[str] = []

    # --- channel spaces and coupling ---

    def _new_space(self, name: str, size: int, reason: str | None = None) -> Layout:
        space = _Space(name, len(self.parent), size, reason)
        self.spaces.append(space)
        self.space_of += [len(self.spaces) - 1] * size
        self.parent += list(space.ids)
        return tuple(space.ids)

    def find(self, c: int) -> int:
        """Root of channel `c` in the union-find forest: channels with one root are coupled."""
        parent = self.parent
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    def _couple(self, a: Layout, b: Layout) -> None:
        for x, y in zip(a, b):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:  # the smaller id stays root: deterministic group order
                self.parent[max(rx, ry)] = min(rx, ry)

    def _forbid(self, layout: Layout | None, reason: str) -> list[str]:
        """Mark the spaces of `layout` unprunable; returns the names of those that were not yet."""
        names = []
        for index in dict.fromkeys(self.space_of[c] for c in layout or ()):
            space = self.spaces[index]
            if space.reason is None:
                space.reason = reason
                names.append(space.name)
        return names

    def _role(self, kind: str, param: str, dim: int, ids: Layout) -> None:
        key = (param, dim)
        if key in self.roles:  # a module called twice: row k serves both calls, so they are one channel
            self._couple(self.roles[key][1], ids)
        else:
            self.roles[key] = (kind, list(ids))

    # --- the walk ---

    def run(self) -> None:
        for node in self.graph.nodes:
            self._visit(node)

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._fresh_space(node, f"input:{node.name}", "network input")
            return
        if node.op == "get_attr":  # a parameter or buffer read in a forward: its reader says what it is
            self.attrs[node] = node.target
            return
        if node.op == "output":
            for source in node.all_input_nodes:
                for layout in [self.layouts.get(source)] + self.parts.get(source, []):
                    self._forbid(layout, "network output")
            return
        touched = [n for n in node.all_input_nodes if n in self.layouts or n in self.parts]
        if not touched:
            self._untracked(node)
            return
        try:
            layout = self._follow(node)
            shape = _shape(node)
            if layout is None and shape is not None:
                raise _Unsupported("returns a tensor")
            dim = self.channel_dim.get(node, 1)
            if layout is not None and (shape is None or len(shape) <= max(dim, 1) or shape[dim] != len(layout)):
                raise _Unsupported("its output channels do not match its input", layout)
        except _Unsupported as exc:
            self._give_up(node, touched, exc)
            return
        if layout is not None:
            self.layouts[node] = layout

    def _untracked(self, node: fx.Node) -> None:
        """No channel layout flows in: a constant or parameter read directly, a shape, or a piece
        of what an unsupported op returned (the items of a tuple it returned, say)."""
        source = next((self.opaque[n] for n in node.all_input_nodes if n in self.opaque), None)
        if source is None:
            self._fresh_space(node, f"const:{node.name}", "not derived from traced channels")
        else:
            self.opaque[node] = source
            self._fresh_space(node, f"opaque:{node.name}", f"output of unsupported {source}")

    def _fresh_space(self, node: fx.Node, name: str, reason: str, dim: int = 1) -> None:
        shape = _shape(node)
        if shape is not None and len(shape) > max(dim, 1):
            self.layouts[node] = self._new_space(name, shape[dim], reason)
            if dim != 1:
                self.channel_dim[node] = dim

    def _give_up(self, node: fx.Node, touched: list[fx.Node], exc: _Unsupported) -> None:
        why = exc.why
        stack = node.meta.get("nn_module_stack") or {}
        kinds = [kind for _, kind in stack.values() if isinstance(kind, type)]
        if not why and any(issubclass(kind, _CROSS_CHANNEL_NORMS) for kind in kinds):
            why = _NORM_ACROSS  # a permute inside timm's LayerNorm2d, say: the norm is why
        what = self._describe(node) + (f", which {why}" if why else "")
        names: list[str] = []
        layouts = [self.layouts[n] for n in touched if n in self.layouts]
        layouts += [part for n in touched for part in self.parts.get(n, [])]
        for layout in layouts + [exc.layout]:
            names += self._forbid(layout, f"touches unsupported {what}")
        if names:  # ops on what an earlier unsupported op returned repeat its warning: left out
            self.unsupported.append(f"cannot follow channels through {what}; left unprunable: {', '.join(names)}")
        self.opaque[node] = what
        # what a per-position op (LayerNorm on (B, H, W, C)) returns has its channels where its input had them
        dims = {self.channel_dim.get(n, 1) for n in touched if n in self.layouts}
        dim = dims.pop() if len(dims) == 1 else 1
        shape, first = _shape(node), next((n for n in touched if n in self.layouts), None)
        if dim != 1 and not (shape and first is not None and len(shape) == len(_shape(first) or ())):
            dim = 1
        self._fresh_space(node, f"opaque:{node.name}", f"output of unsupported {what}", dim)

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[node.target]).__name__} module '{node.target}'"
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        call = f".{name}()" if node.op == "call_method" else f"{name}()"
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return f"{call} in the model's forward"
        path, kind = list(stack.values())[-1]
        return f"{call} in '{path}' ({getattr(kind, '__name__', kind)})"

    def _layout(self, value, shifted_ok: bool = False, moved_ok: bool = False) -> Layout:
        if not isinstance(value, fx.Node) or value not in self.layouts:
            raise _Unsupported("takes an operand that is not a traced channel tensor")
        if value in self.channel_dim and not moved_ok:
            raise _Unsupported(f"reads channels moved to dim {self.channel_dim[value]} (by a permute), where it "
                               "is not followed")
        if value in self.shifted and not shifted_ok:
            raise _Unsupported("reads channels that are not zero where their producers are (after a sigmoid, "
                               "an added constant or the like)")
        return self.layouts[value]

    def _read(self, node: fx.Node, source, moved_ok: bool = False) -> Layout:
        """The input layout of a conv or linear. A shifted input's columns cannot be cut (their
        channels are not zero); the layer's own outputs still can, so only the input is forbidden."""
        layout = self._layout(source, shifted_ok=True, moved_ok=moved_ok)
        if source in self.shifted:
            what = f"{self._describe(node)}, which reads channels that are not zero where their producers are " \
                   "(after a sigmoid, an added constant or the like)"
            names = self._forbid(layout, f"read by {what}")
            self.unsupported.append(f"cannot cut the input channels of {what}; left unprunable: {', '.join(names)}")
        return layout

    def _passed(self, node: fx.Node, source, moved_ok: bool = False) -> Layout:
        """The layout of a per-channel op with f(0) == 0: its input's, shifted if the input is (and, for
        an elementwise op, on the dim its input has them)."""
        layout = self._layout(source, shifted_ok=True, moved_ok=moved_ok)
        if source in self.shifted:
            self.shifted.add(node)
        if source in self.channel_dim:
            self.channel_dim[node] = self.channel_dim[source]
        return layout

    def _shifting(self, node: fx.Node, source) -> Layout:
        layout = self._passed(node, source, moved_ok=True)
        self.shifted.add(node)
        return layout

    def _param(self, value, what: str) -> str | None:
        """Qualified name of the parameter a functional call reads (None for None); raises when
        the operand is computed (a transformed weight: cutting its rows would change the rest)."""
        if value is None:
            return None
        name = self.attrs.get(value) if isinstance(value, fx.Node) else None
        if name is None or name not in self.params:
            raise _Unsupported(f"takes a {what} computed in the forward, not a parameter")
        if name in self.shared_params:
            raise _Unsupported(f"reads the {what} '{name}', which is shared with another module")
        return name

    def _follow(self, node: fx.Node) -> Layout | None:
        if node.op == "call_module":
            return self._follow_module(node, self.modules[node.target])
        target = node.target
        if node.op == "call_function" and target is builtins.getattr and node.args[1] in _METADATA_ATTRS:
            return None
        if target in _METADATA_CALLS:
            return None
        if target is operator.getitem:
            return self._getitem(node)
        source = _arg(node, 0, "input")
        if target in _ZERO_PRESERVING_CALLS:
            return self._passed(node, source, moved_ok=True)
        if target in _PERMUTE_CALLS or target in _TRANSPOSE_CALLS:
            return self._permute(node)
        if target in _SPATIAL_CALLS:
            return self._spatial(node, source, _SPATIAL_CALLS[target])
        if target is F.pad:
            pad, mode, value = _arg(node, 1, "pad", ()), _arg(node, 2, "mode", "constant"), _arg(node, 3, "value")
            if mode == "constant" and value not in (None, 0):
                raise _Unsupported("pads with a nonzero value")
            if not isinstance(pad, (tuple, list)) or len(pad) > 2 * (len(_shape(source) or ()) - 2):
                raise _Unsupported("pads the channel or batch dimension")
            return self._spatial(node, source, None)
        if target is F.interpolate:
            return self._spatial(node, source, None)
        if target in _SHIFTING_CALLS:
            return self._shifting(node, source)
        if target in _CROSS_CHANNEL_NORM_CALLS:
            raise _Unsupported(_NORM_ACROSS)
        if target in _CONV_CALLS:
            return self._conv_call(node)
        if target is F.linear:
            weight = self._param(_arg(node, 1, "weight"), "weight")
            return self._linear(node, _space_of(weight), weight, self._param(_arg(node, 2, "bias"), "bias"),
                                source, self.params[weight].shape)
        if target is F.batch_norm:
            return self._batchnorm_call(node)
        if target in _ADD_CALLS:
            return self._add(node)
        if target in _MUL_CALLS:
            return self._mul(node)
        if target in _DIV_CALLS:
            divisor = _arg(node, 1, "other")
            if not _is_number(divisor) or divisor == 0:
                raise _Unsupported("divides by a tensor")
            return self._passed(node, source, moved_ok=True)
        if target in _CAT_CALLS:
            return self._cat(node)
        if target in _CHUNK_CALLS or target in _SPLIT_CALLS:
            return self._split(node)
        if target in _FLATTEN_CALLS:
            return self._flatten(node, source, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if target in _RESHAPE_CALLS:
            return self._reshape(node)
        if target in _REDUCE_CALLS:
            return self._reduce(node)
        raise _Unsupported()

    def _follow_module(self, node: fx.Node, m: nn.Module) -> Layout:
        if m._forward_hooks or m._forward_pre_hooks:
            raise _Unsupported("has forward hooks that may change what it computes")
        if id(m) in self.sharing:
            raise _Unsupported("shares parameters with another module")
        source = node.args[0] if node.args else None
        name = node.target
        if type(m) in _CONVS:
            layout = self._read(node, source)
            if len(layout) != m.in_channels:
                raise _Unsupported("gets an input of unexpected width")
            return self._conv(name, f"{name}.weight", f"{name}.bias" if m.bias is not None else None,
                              layout, m.groups, m.out_channels)
        if type(m) in _BATCHNORMS:
            if not m.affine:
                raise _Unsupported("has no affine weight and bias, so it cannot output zero")
            stats = [f"{name}.{b}" for b in ("running_mean", "running_var") if getattr(m, b) is not None]
            return self._batchnorm(f"{name}.weight", f"{name}.bias", stats, self._layout(source, shifted_ok=True),
                                   m.num_features)
        if type(m) is nn.Linear:
            return self._linear(node, name, f"{name}.weight", f"{name}.bias" if m.bias is not None else None,
                                source, m.weight.shape)
        if type(m) is nn.Flatten:
            return self._flatten(node, source, m.start_dim, m.end_dim)
        if type(m) in _ZERO_PRESERVING_MODULES:
            return self._passed(node, source, moved_ok=True)
        if type(m) in _SPATIAL_MODULES:
            return self._spatial(node, source, _SPATIAL_MODULES[type(m)])
        if type(m) is nn.Upsample:
            return self._spatial(node, source, None)
        if type(m) in _SHIFTING_MODULES:
            return self._shifting(node, source)
        if isinstance(m, _CROSS_CHANNEL_NORMS):
            raise _Unsupported(_NORM_ACROSS)
        raise _Unsupported()

    # --- op handlers: each returns the output layout or raises _Unsupported ---

    def _produced(self, name: str, size: int) -> Layout:
        if name not in self.module_spaces:
            self.module_spaces[name] = self._new_space(name, size)
        return self.module_spaces[name]

    def _conv(self, space: str, weight: str, bias: str | None, layout: Layout, groups: int,
              out_channels: int) -> Layout:
        if groups == 1:
            self._role("consumer", weight, 1, layout)
            out = self._produced(space, out_channels)
        elif groups == len(layout) == out_channels:
            out = layout  # depthwise: channel k in, channel k out, its weights belong to channel k
        else:
            # Grouped: output group j reads input group j alone, and the weight is one rectangle for
            # all groups. Two exact ways to cut it; the finer one for this shape is taken:
            #   whole groups: group j's inputs and outputs go together (surgery lowers `groups`);
            #   equal counts: position p of every group goes together, on the input side (a weight
            #   column) and on the output side (a row of every group), `groups` stays.
            out = self._produced(space, out_channels)
            per_in, per_out = len(layout) // groups, out_channels // groups
            if groups >= per_in + per_out:  # more groups than channels per group: groups are finer
                for j in range(groups):
                    block = layout[j * per_in:(j + 1) * per_in] + out[j * per_out:(j + 1) * per_out]
                    self._couple(block[:1] * len(block), block)
            else:
                for j in range(1, groups):
                    self._couple(layout[:per_in], layout[j * per_in:(j + 1) * per_in])
                    self._couple(out[:per_out], out[j * per_out:(j + 1) * per_out])
                self._role("consumer", weight, 1, layout[:per_in])
        self._role("producer", weight, 0, out)
        if bias is not None:
            self._role("producer", bias, 0, out)
        return out

    def _conv_call(self, node: fx.Node) -> Layout:
        layout = self._read(node, _arg(node, 0, "input"))
        weight = self._param(_arg(node, 1, "weight"), "weight")
        bias = self._param(_arg(node, 2, "bias"), "bias")
        groups = _arg(node, 6, "groups", 1)
        shape = self.params[weight].shape
        if not isinstance(groups, int) or len(layout) != shape[1] * groups:
            raise _Unsupported("gets an input of unexpected width")
        owner = weight.rpartition(".")[0]
        if groups > 1 and not isinstance(self.owners.get(owner), nn.modules.conv._ConvNd):
            raise _Unsupported("is a grouped conv outside an nn.Conv module, whose groups a cut cannot update")
        return self._conv(_space_of(weight), weight, bias, layout, groups, shape[0])

    def _batchnorm(self, weight: str, bias: str, stats: list[str], layout: Layout, features: int) -> Layout:
        """Per channel; zero where its weight and bias are, whatever it reads (so a shifted input is
        fine: those are producers of the channel, and the output is not shifted)."""
        if len(layout) != features:
            raise _Unsupported("gets an input of unexpected width")
        self._role("producer", weight, 0, layout)
        self._role("producer", bias, 0, layout)
        for buffer in stats:
            self._role("buffer", buffer, 0, layout)
        return layout

    def _batchnorm_call(self, node: fx.Node) -> Layout:
        """F.batch_norm(input, running_mean, running_var, weight, bias, ...) as a fused norm module
        (timm's BatchNormAct2d) calls it: per channel, zero where its weight and bias are."""
        weight, bias = _arg(node, 3, "weight"), _arg(node, 4, "bias")
        if weight is None or bias is None:
            raise _Unsupported("has no affine weight and bias, so it cannot output zero")
        weight, bias = self._param(weight, "weight"), self._param(bias, "bias")
        stats = []
        for index, name in ((1, "running_mean"), (2, "running_var")):
            value = _arg(node, index, name)
            if value is not None:
                if self.attrs.get(value) is None:
                    raise _Unsupported(f"takes a {name} computed in the forward")
                stats.append(self.attrs[value])
        return self._batchnorm(weight, bias, stats, self._layout(_arg(node, 0, "input"), shifted_ok=True),
                               self.params[weight].shape[0])

    def _linear(self, node: fx.Node, space: str, weight: str, bias: str | None, source, shape) -> Layout:
        layout = self._read(node, source, moved_ok=True)
        ndim = len(_shape(source) or ())
        # features on the last dim: (batch, features), or (B, H, W, C) channels moved there by a permute
        if ndim < 2 or self.channel_dim.get(source, 1) != ndim - 1 or len(layout) != shape[1]:
            raise _Unsupported("is applied to a tensor whose channels are not its last dim")
        if ndim > 2:
            self.channel_dim[node] = ndim - 1
        self._role("consumer", weight, 1, layout)
        out = self._produced(space, shape[0])
        self._role("producer", weight, 0, out)
        if bias is not None:
            self._role("producer", bias, 0, out)
        return out

    def _spatial(self, node: fx.Node, source, spatial_dims: int | None) -> Layout:
        ndim = len(_shape(source) or ())
        if (ndim - 2 != spatial_dims) if spatial_dims is not None else ndim < 3:
            raise _Unsupported(f"gets a {ndim}-D input, on which it does not act on each channel alone")
        return self._passed(node, source)

    def _operands(self, node: fx.Node):
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        if _is_number(a):
            a, b = b, a
        return a, b

    def _add(self, node: fx.Node) -> Layout:
        a, b = self._operands(node)
        if _is_number(b):  # x + c is c where x is 0: the channels stay per channel but shifted
            layout = self._passed(node, a, moved_ok=True)
            if b != 0:
                self.shifted.add(node)
            return layout
        layout = self._pair(node, a, b)
        if a in self.shifted or b in self.shifted:
            self.shifted.add(node)
        return layout

    def _mul(self, node: fx.Node) -> Layout:
        a, b = self._operands(node)
        if _is_number(b):
            return self._passed(node, a, moved_ok=True)
        # x * g is zero where either is: a gate g (SE's sigmoid) may be shifted as long as x is not
        layout = self._pair(node, a, b)
        if a in self.shifted and b in self.shifted:
            self.shifted.add(node)
        return layout

    def _pair(self, node: fx.Node, a, b) -> Layout:
        """Channel k of an elementwise op on two channel tensors is channel k of both: couple them."""
        la, lb = self._layout(a, shifted_ok=True, moved_ok=True), self._layout(b, shifted_ok=True, moved_ok=True)
        dim = self.channel_dim.get(a, 1)
        if len(la) != len(lb) or len(_shape(a)) != len(_shape(b)) or dim != self.channel_dim.get(b, 1):
            raise _Unsupported("broadcasts across channels")
        if dim != 1:
            self.channel_dim[node] = dim
        self._couple(la, lb)
        return la

    def _cat(self, node: fx.Node) -> Layout:
        tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
            raise _Unsupported("has arguments the tracer cannot read")
        layouts = [self._layout(t, shifted_ok=True) for t in tensors]
        if any(t in self.shifted for t in tensors):
            self.shifted.add(node)
        if dim % len(_shape(tensors[0])) == 1:
            return tuple(itertools.chain.from_iterable(layouts))
        if any(len(layout) != len(layouts[0]) for layout in layouts):
            raise _Unsupported("joins tensors of different widths")
        for layout in layouts[1:]:  # along batch or space: channel k of every part is one channel
            self._couple(layouts[0], layout)
        return layouts[0]

    def _split(self, node: fx.Node) -> None:
        """torch.split / chunk: a tuple whose items are read by operator.getitem."""
        source = _arg(node, 0, "input", _arg(node, 0, "tensor"))
        layout = self._layout(source, shifted_ok=True)
        size, dim = node.args[1] if len(node.args) > 1 else None, _arg(node, 2, "dim", 0)
        metas = node.meta.get("tensor_meta")
        if not isinstance(dim, int) or not isinstance(metas, (tuple, list)) \
                or not all(isinstance(m, TensorMetadata) for m in metas):
            raise _Unsupported("has arguments the tracer cannot read")
        ndim = len(_shape(source))
        widths = [tuple(m.shape)[dim % ndim] for m in metas]
        if dim % ndim != 1:
            parts = [layout] * len(metas)
        elif node.target in _SPLIT_CALLS and not isinstance(size, fx.Node):
            raise _Unsupported("splits channels at fixed sizes, which a cut would leave stale "
                               "(chunk() keeps up with a cut)")
        elif len(set(widths)) != 1:
            raise _Unsupported("splits channels into unequal parts")
        else:
            # Equal parts computed from the width at run time (chunk): they stay equal only if
            # every part loses the same positions, so position p of each part is one channel.
            width = widths[0]
            parts = [layout[i * width:(i + 1) * width] for i in range(len(widths))]
            for part in parts[1:]:
                self._couple(parts[0], part)
        self.parts[node] = parts
        if source in self.shifted:
            self.shifted.add(node)
        return None

    def _getitem(self, node: fx.Node) -> Layout:
        source, index = node.args
        if source in self.parts:
            if not isinstance(index, int):
                raise _Unsupported("indexes a split with something other than an integer")
            if source in self.shifted:
                self.shifted.add(node)
            return self.parts[source][index]
        layout, shape = self._passed(node, source), _shape(source)
        items = list(index) if isinstance(index, tuple) else [index]
        if any(item is not Ellipsis and not isinstance(item, slice) for item in items) \
                or items.count(Ellipsis) > 1:
            raise _Unsupported("indexes with integers, tensors or None, which move the channel dim")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
        bounds = (items[1].start, items[1].stop, items[1].step) if len(items) > 1 else ()
        if bounds and not any(isinstance(b, fx.Node) for b in bounds) \
                and items[1].indices(len(layout)) == (0, len(layout), 1):
            return layout  # keeps every channel; the bound stays past the end after a cut
        if len(items) > 1:
            raise _Unsupported("slices channels at fixed offsets, which a cut would leave stale")
        return layout

    def _permute(self, node: fx.Node) -> Layout:
        """permute / transpose: the same channels, on the dim the channel dim moves to."""
        source = node.args[0]
        layout = self._passed(node, source, moved_ok=True)
        ndim, dim = len(_shape(source)), self.channel_dim.get(source, 1)
        if node.target in _PERMUTE_CALLS:
            dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            dims = dims or node.kwargs.get("dims", ())
            if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
                raise _Unsupported("has arguments the tracer cannot read")
            moved = [d % ndim for d in dims].index(dim)
        else:
            pair = [_arg(node, 1, "dim0"), _arg(node, 2, "dim1")]
            if not all(isinstance(d, int) for d in pair):
                raise _Unsupported("has arguments the tracer cannot read")
            first, second = (d % ndim for d in pair)
            moved = second if dim == first else first if dim == second else dim
        self.channel_dim.pop(node, None)
        if moved != 1:
            self.channel_dim[node] = moved
        return layout

    def _flatten(self, node: fx.Node, source, start, end) -> Layout:
        layout, shape = self._passed(node, source), _shape(source)
        if not isinstance(start, int) or not isinstance(end, int) \
                or start % len(shape) != 1 or end % len(shape) != len(shape) - 1:
            raise _Unsupported("flattens other than (batch, everything else)")
        block = math.prod(shape[2:])  # channel-major: channel c owns columns c*block .. c*block+block-1
        return tuple(c for c in layout for _ in range(block))

    def _reshape(self, node: fx.Node) -> Layout:
        source, dims = node.args[0], node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        out, shape = _shape(node), _shape(source)
        # A literal width (view(-1, 512)) would break once channels are cut, so only (batch, -1).
        if len(dims) != 2 or not (isinstance(dims[1], int) and dims[1] == -1) or out is None \
                or shape is None or len(out) != 2 or out[0] != shape[0]:
            raise _Unsupported("reshapes to anything but (batch, -1)")
        return self._flatten(node, source, 1, -1)

    def _reduce(self, node: fx.Node) -> Layout:
        source, dims = _arg(node, 0, "input"), _arg(node, 1, "dim")
        layout, shape = self._passed(node, source), _shape(source)
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims) \
                or any(d % len(shape) < 2 for d in dims):
            raise _Unsupported("reduces over the batch or channel dimension")
        return layout

    # --- results, read by groups.py ---

    def channel(self, c: int) -> tuple[str, int]:
        """(space name, index in it) of global channel id `c`."""
        space = self.spaces[self.space_of[c]]
        return space.name, c - space.first


def _space_of(weight: str) -> str:
    """The channel space a functional conv/linear makes, named as a module's would be ("conv" for
    "conv.weight"); a module calling two weights of its own ("blk.w1", "blk.w2") makes two spaces."""
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


def _aliased_parameters(model: nn.Module) -> set[str]:
    """Qualified names of parameters reachable under more than one name (tied weights)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return {name for aliases in names.values() if len(aliases) > 1 for name in aliases}


def _modules_sharing_parameters(model: nn.Module) -> set[int]:
    """ids of modules holding a parameter that another module also holds (tied weights)."""
    holders: dict[int, set[int]] = defaultdict(set)
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)].add(id(m))
    return {m for owners in holders.values() if len(owners) > 1 for m in owners}
