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

What it follows is listed in the tables below (modules are matched by exact type).
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

    `example_input` defaults to one random 3x32x32 image on the model's device. A model fx
    cannot trace, or one that fails on the example input, raises CifarpressError; ops that
    cannot be followed are only listed in the result's `unsupported`.
    """
    graph_module = _trace(model)
    x = example_input if example_input is not None else _example_input(model)
    with eval_mode(model):  # the graph module shares the model's submodules
        try:
            ShapeProp(graph_module).propagate(x)
        except Exception as exc:
            raise CifarpressError(
                f"running {type(model).__name__} on an input of shape {tuple(x.shape)} failed ({_first_line(exc)}); "
                "pass example_input with the shape the model expects"
            ) from exc
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
    first = next((p for p in itertools.chain(model.parameters(), model.buffers()) if p.is_floating_point()), None)
    if first is None:
        return torch.randn(1, 3, 32, 32)
    return torch.randn(1, 3, 32, 32, device=first.device, dtype=first.dtype)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- what the tracer follows ------------------------------------------------------------------
# Modules are matched by exact type: a subclass (a QAT conv, a parametrized weight) may
# compute something else from the same attributes, so it counts as unsupported.

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# f(0) == 0 and acts on each channel alone. Not Sigmoid, Softplus (f(0) != 0) or Softmax (mixes channels).
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Tanh, nn.Softsign, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_ZERO_PRESERVING_CALLS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "detach",
}
_ADD_CALLS = {operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, operator.isub, torch.sub,
              "sub", "sub_"}
_MUL_CALLS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV_CALLS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CAT_CALLS = {torch.cat, torch.concat, torch.concatenate}
_FLATTEN_CALLS = {torch.flatten, "flatten"}
_RESHAPE_CALLS = {torch.reshape, "reshape", "view"}
_REDUCE_CALLS = {torch.mean, "mean", torch.sum, "sum"}
_METADATA_CALLS = {"size", "dim", "numel"}
_METADATA_ATTRS = {"shape", "device", "dtype", "ndim", "is_cuda"}


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
        self.spaces: list[_Space] = []
        self.space_of: list[int] = []   # channel id -> index in self.spaces
        self.parent: list[int] = []     # union-find forest over channel ids
        self.layouts: dict[fx.Node, Layout] = {}
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
        names = []
        for index in dict.fromkeys(self.space_of[c] for c in layout or ()):
            space = self.spaces[index]
            space.reason = space.reason or reason
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
        if node.op == "output":
            for source in node.all_input_nodes:
                self._forbid(self.layouts.get(source), "network output")
            return
        touched = [n for n in node.all_input_nodes if n in self.layouts]
        if not touched:
            self._untracked(node)
            return
        try:
            layout = self._follow(node)
            shape = _shape(node)
            if layout is None and shape is not None:
                raise _Unsupported("returns a tensor")
            if layout is not None and (shape is None or len(shape) < 2 or shape[1] != len(layout)):
                raise _Unsupported("its output channels do not match its input", layout)
        except _Unsupported as exc:
            self._give_up(node, touched, exc)
            return
        if layout is not None:
            self.layouts[node] = layout

    def _untracked(self, node: fx.Node) -> None:
        """No channel layout flows in: a constant or parameter read directly, a shape, or a piece
        of what an unsupported op returned (the items of torch.split's tuple, say)."""
        source = next((self.opaque[n] for n in node.all_input_nodes if n in self.opaque), None)
        if source is None:
            self._fresh_space(node, f"const:{node.name}", "not derived from traced channels")
        else:
            self.opaque[node] = source
            self._fresh_space(node, f"opaque:{node.name}", f"output of unsupported {source}")

    def _fresh_space(self, node: fx.Node, name: str, reason: str) -> None:
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            self.layouts[node] = self._new_space(name, shape[1], reason)

    def _give_up(self, node: fx.Node, touched: list[fx.Node], exc: _Unsupported) -> None:
        what = self._describe(node) + (f", which {exc.why}" if exc.why else "")
        names: list[str] = []
        for layout in [self.layouts[n] for n in touched] + [exc.layout]:
            names += self._forbid(layout, f"touches unsupported {what}")
        self.unsupported.append(
            f"cannot follow channels through {what}; left unprunable: {', '.join(dict.fromkeys(names))}"
        )
        self.opaque[node] = what
        self._fresh_space(node, f"opaque:{node.name}", f"output of unsupported {what}")

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

    def _layout(self, value) -> Layout:
        if not isinstance(value, fx.Node) or value not in self.layouts:
            raise _Unsupported("takes an operand that is not a traced channel tensor")
        return self.layouts[value]

    def _follow(self, node: fx.Node) -> Layout | None:
        if node.op == "call_module":
            return self._follow_module(node, self.modules[node.target])
        target = node.target
        if node.op == "call_function" and target is builtins.getattr and node.args[1] in _METADATA_ATTRS:
            return None
        if target in _METADATA_CALLS:
            return None
        if target in _ZERO_PRESERVING_CALLS:
            return self._layout(_arg(node, 0, "input"))
        if target in _ADD_CALLS:
            return self._elementwise(node, scalar_ok=False)  # x + c is c, not 0, where x is 0
        if target in _MUL_CALLS:
            return self._elementwise(node, scalar_ok=True)
        if target in _DIV_CALLS:
            divisor = _arg(node, 1, "other")
            if not _is_number(divisor) or divisor == 0:
                raise _Unsupported("divides by a tensor")
            return self._layout(_arg(node, 0, "input"))
        if target in _CAT_CALLS:
            return self._cat(node)
        if target in _FLATTEN_CALLS:
            return self._flatten(_arg(node, 0, "input"), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
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
        if type(m) in _CONVS:
            return self._conv(node.target, m, self._layout(source))
        if type(m) in _BATCHNORMS:
            return self._batchnorm(node.target, m, self._layout(source))
        if type(m) is nn.Linear:
            return self._linear(node.target, m, source)
        if type(m) is nn.Flatten:
            return self._flatten(source, m.start_dim, m.end_dim)
        if type(m) in _ZERO_PRESERVING_MODULES:
            return self._layout(source)
        raise _Unsupported()

    # --- op handlers: each returns the output layout or raises _Unsupported ---

    def _produced(self, name: str, size: int) -> Layout:
        if name not in self.module_spaces:
            self.module_spaces[name] = self._new_space(name, size)
        return self.module_spaces[name]

    def _conv(self, name: str, m: nn.Module, layout: Layout) -> Layout:
        if len(layout) != m.in_channels:
            raise _Unsupported("gets an input of unexpected width")
        if m.groups == 1:
            self._role("consumer", f"{name}.weight", 1, layout)
            out = self._produced(name, m.out_channels)
        elif m.groups == m.in_channels == m.out_channels:
            out = layout  # depthwise: channel k in, channel k out, its weights belong to channel k
        else:
            raise _Unsupported(f"is a grouped conv (groups={m.groups})")
        self._role("producer", f"{name}.weight", 0, out)
        if m.bias is not None:
            self._role("producer", f"{name}.bias", 0, out)
        return out

    def _batchnorm(self, name: str, m: nn.Module, layout: Layout) -> Layout:
        if not m.affine:
            raise _Unsupported("has no affine weight and bias, so it cannot output zero")
        if len(layout) != m.num_features:
            raise _Unsupported("gets an input of unexpected width")
        self._role("producer", f"{name}.weight", 0, layout)
        self._role("producer", f"{name}.bias", 0, layout)
        for buffer in ("running_mean", "running_var"):
            if getattr(m, buffer) is not None:
                self._role("buffer", f"{name}.{buffer}", 0, layout)
        return layout

    def _linear(self, name: str, m: nn.Linear, source) -> Layout:
        layout = self._layout(source)
        if len(_shape(source) or ()) != 2 or len(layout) != m.in_features:
            raise _Unsupported("is applied to a tensor that is not (batch, features)")
        self._role("consumer", f"{name}.weight", 1, layout)
        out = self._produced(name, m.out_features)
        self._role("producer", f"{name}.weight", 0, out)
        if m.bias is not None:
            self._role("producer", f"{name}.bias", 0, out)
        return out

    def _elementwise(self, node: fx.Node, scalar_ok: bool) -> Layout:
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        if scalar_ok and _is_number(b):
            return self._layout(a)
        if scalar_ok and _is_number(a):
            return self._layout(b)
        if _is_number(a) or _is_number(b):
            raise _Unsupported("adds a constant, so a zero channel would not stay zero")
        la, lb = self._layout(a), self._layout(b)
        if len(la) != len(lb) or len(_shape(a)) != len(_shape(b)):
            raise _Unsupported("broadcasts across channels")
        self._couple(la, lb)  # the result's channel k is zero only if both operands' are
        return la

    def _cat(self, node: fx.Node) -> Layout:
        tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
            raise _Unsupported("has arguments the tracer cannot read")
        layouts = [self._layout(t) for t in tensors]
        if dim % len(_shape(tensors[0])) == 1:
            return tuple(itertools.chain.from_iterable(layouts))
        if any(len(layout) != len(layouts[0]) for layout in layouts):
            raise _Unsupported("joins tensors of different widths")
        for layout in layouts[1:]:  # along batch or space: channel k of every part is one channel
            self._couple(layouts[0], layout)
        return layouts[0]

    def _flatten(self, source, start, end) -> Layout:
        layout, shape = self._layout(source), _shape(source)
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
        return self._flatten(source, 1, -1)

    def _reduce(self, node: fx.Node) -> Layout:
        source, dims = _arg(node, 0, "input"), _arg(node, 1, "dim")
        layout, shape = self._layout(source), _shape(source)
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


def _modules_sharing_parameters(model: nn.Module) -> set[int]:
    """ids of modules holding a parameter that another module also holds (tied weights)."""
    holders: dict[int, set[int]] = defaultdict(set)
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)].add(id(m))
    return {m for owners in holders.values() if len(owners) > 1 for m in owners}
