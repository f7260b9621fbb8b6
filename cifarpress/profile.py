"""Per-layer parameter and MAC counts from one traced forward pass.

Convention (the one the CIFAR papers' tables use): MACs are the
multiply-accumulates of convolutions and matrix products only, for a batch of
one image. BatchNorm, activations, pooling, residual adds and biases count 0.
The counts come from PyTorch's own `torch.utils.flop_counter.FlopCounterMode`
(2 FLOPs per MAC), so `F.conv2d` or `x @ w` inside a user's module count as
much as an `nn.Conv2d`; forward hooks only attribute them to layers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from rich.table import Table
from torch import nn


@dataclass
class LayerStat:
    name: str           # qualified module name, e.g. "layer1.0.conv1"
    kind: str           # module class name, e.g. "Conv2d"
    params: int         # the module's own parameters (for conv/linear: including parametrizations)
    macs: int           # per image, summed over every call of the module in one forward
    output_shape: tuple  # output shape of the first call, batch dimension included


@dataclass
class ModelProfile:
    layers: list[LayerStat] = field(default_factory=list)
    params: int = 0     # sum over model.parameters(): nothing is missed, shared ones count once
    macs: int = 0       # sum of the layers' MACs, per image

    def to_dict(self) -> dict:
        """JSON-ready dict: totals plus one entry per layer (shapes as lists)."""
        return {
            "params": self.params,
            "macs": self.macs,
            "layers": [{**asdict(layer), "output_shape": list(layer.output_shape)} for layer in self.layers],
        }


def _torch_owned(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.")


def _is_conv(m: nn.Module) -> bool:
    # nn.Conv1d/2d/3d, their transposed forms, and torch's look-alikes (quantized convs);
    # duck typing is limited to torch's own classes so a user block is never mistaken for one
    return isinstance(m, nn.modules.conv._ConvNd) or (_torch_owned(m) and all(
        hasattr(m, a) for a in ("in_channels", "out_channels", "kernel_size", "groups")
    ))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (
        _torch_owned(m) and hasattr(m, "in_features") and hasattr(m, "out_features")
    )


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for item in obj.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _layer_modules(model: nn.Module) -> dict[nn.Module, tuple[str, bool]]:
    """Modules that get a row, with their names and whether their params are counted recursively.

    A row for each leaf module, each conv/linear (even when parametrized, which
    gives it children), and each container that holds parameters directly.
    Modules inside a conv/linear (its parametrizations) are folded into it.
    """
    rows: dict[nn.Module, tuple[str, bool]] = {}
    folded: set[int] = set()
    for name, m in model.named_modules(remove_duplicate=True):
        if id(m) in folded:
            continue
        label = name or type(m).__name__
        if _is_conv(m) or _is_linear(m):
            for sub in m.modules():
                if sub is not m:
                    folded.add(id(sub))
            rows[m] = (label, True)
        elif not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False)):
            rows[m] = (label, False)
    return rows


def _example_input(model: nn.Module, input_shape) -> torch.Tensor:
    device, dtype, channels_last = torch.device("cpu"), torch.float32, False
    tensors = [t for t in list(model.parameters()) + list(model.buffers())
               if not isinstance(t, nn.parameter.UninitializedTensorMixin)]  # lazy modules
    for t in tensors:
        if t.is_floating_point():
            device, dtype = t.device, t.dtype
            break
    for p in tensors:
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            channels_last = True
            break
    x = torch.randn(tuple(input_shape), device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def profile_model(model: nn.Module, input_shape=(1, 3, 32, 32), *, example_input: torch.Tensor | None = None) -> ModelProfile:
    """Count parameters and MACs per layer with one forward pass (eval mode, no grad).

    MACs are multiply-accumulates of conv and linear layers only, per image, as
    in the papers' tables: Conv = output elements x in_channels/groups x kernel
    area (bias free); Linear = in_features x out_features; BatchNorm, ReLU,
    pooling and adds count 0. A layer's params are its own (recurse=False;
    a conv/linear also counts its parametrizations' originals); the total is sum(model.parameters()), so parameters held outside any
    profiled layer are still counted.

    The input is random, of `input_shape`, on the device and dtype of the
    model's parameters, channels_last when the model's conv weights are;
    pass `example_input` to use your own tensor instead. The model's (and each
    submodule's) training flag is restored and all hooks removed, even when the
    forward pass raises.
    """
    from torch.utils.flop_counter import FlopCounterMode

    rows = _layer_modules(model)
    stats: dict[nn.Module, LayerStat] = {}

    def hook(module, inputs, output):
        if module not in stats:
            # counted here, not before the pass: lazy modules materialise on their first call
            name, recurse = rows[module]
            params = sum(p.numel() for p in module.parameters(recurse=recurse))
            out = _first_tensor(output)
            shape = tuple(out.shape) if out is not None else ()
            stats[module] = LayerStat(name, type(module).__name__, int(params), 0, shape)

    modes = {m: m.training for m in model.modules()}
    handles = []
    # PyTorch's own counter sees every matmul and convolution, including F.conv2d / F.linear calls that no
    # module hook would (a model written functionally reported a quarter of its MACs that way).
    counter = FlopCounterMode(display=False)
    try:
        for m in rows:
            handles.append(m.register_forward_hook(hook))
        x = example_input if example_input is not None else _example_input(model, input_shape)
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    batch = x.shape[0] if x.dim() else 1
    own = _own_macs(model, counter.get_flop_counts(), batch)
    by_module = dict(model.named_modules(remove_duplicate=True))
    for name, macs in own.items():
        module = by_module[name]
        # the row of the module that did the compute, or of the nearest ancestor that has one
        while module not in stats and name:
            name = name.rpartition(".")[0]
            module = by_module[name]
        if module not in stats:
            stats[module] = LayerStat(name or type(model).__name__, type(module).__name__,
                                      int(sum(p.numel() for p in module.parameters(recurse=False))), 0, ())
        stats[module].macs += macs
    layers = list(stats.values())  # in order of first call
    total_params = sum(p.numel() for p in model.parameters())
    return ModelProfile(layers=layers, params=int(total_params), macs=sum(layer.macs for layer in layers))


def _own_macs(model: nn.Module, flop_counts: dict, batch: int) -> dict[str, int]:
    """Per module name ('' = the root): the MACs of the ops it ran itself, not through a child, per image.
    FlopCounterMode counts 2 FLOPs per multiply-accumulate and nests each module's count in its parents'."""
    root = type(model).__name__
    total = {name: sum(flop_counts.get(f"{root}.{name}" if name else root, {}).values())
             for name, _ in model.named_modules(remove_duplicate=True)}
    own = {}
    for name, flops in total.items():
        children = [f"{name}.{child}" if name else child for child, _ in
                    model.get_submodule(name).named_children()] if flops else []
        rest = flops - sum(total.get(c, 0) for c in children)
        if rest > 0:
            own[name] = rest // (2 * batch)
    return own


def human(n: float) -> str:
    """Short count: 432, 2.3K, 0.27M, 40.6M, 126M, 1.23G."""
    n = float(n)
    if n >= 1e9:
        return f"{n / 1e9:.3g}G"
    if n >= 1e5:
        v = n / 1e6
        return f"{v:.2f}M" if v < 1 else f"{v:.3g}M" if v < 100 else f"{v:.0f}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}K"
    return f"{n:.0f}"


def render_profile(profile: ModelProfile, title: str = "Model profile") -> Table:
    """A rich table: one row per layer, then the totals."""
    table = Table(title=title, show_footer=False)
    table.add_column("layer")
    table.add_column("kind")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("% MACs", justify="right")
    for layer in profile.layers:
        share = f"{100 * layer.macs / profile.macs:.1f}%" if profile.macs else "-"
        shape = "x".join(str(d) for d in layer.output_shape) if layer.output_shape else "-"
        table.add_row(layer.name, layer.kind, shape, human(layer.params) if layer.params else "-",
                      human(layer.macs) if layer.macs else "-", share if layer.macs else "-")
    table.add_section()
    table.add_row("total", "", "", human(profile.params), human(profile.macs), "100%" if profile.macs else "-",
                  style="bold")
    return table
