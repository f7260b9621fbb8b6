"""Stand-ins for a conv or linear layer that pruning emptied on one side.

When every channel of a residual branch's inner space is cut, the conv that produced
it has no output channel left and the conv that read it has no input channel left;
torch has no zero-width conv, so surgery puts these in their place:

    ChannelsCut        the producer: an empty channel dimension at the spatial size the
                       conv would give (only its shape travels on, through BN-free
                       activations and pooling, to the consumer).
    ConstantChannels   the consumer: its bias (zero without one) at the conv's output
                       size, which is exactly what a conv computes from all-zero input.

Both are exported to ONNX as shape arithmetic plus ConstantOfShape/Expand, no MACs.
`spec()` / `from_spec()` let a model file record and rebuild them (checkpoint.layer_spec).
"""
from __future__ import annotations

import torch
from torch import nn


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _Geometry(nn.Module):
    """Output spatial size of a 2-d conv (kind 'conv') or the unchanged leading dims of a linear."""

    def __init__(self, kind: str, kernel_size=1, stride=1, padding=0, dilation=1):
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"kind must be conv or linear, got {kind!r}")
        self.kind = kind
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)

    @classmethod
    def geometry_of(cls, layer: nn.Module) -> dict:
        if isinstance(layer, nn.Conv2d):
            return {"kind": "conv", "kernel_size": layer.kernel_size, "stride": layer.stride,
                    "padding": layer.padding, "dilation": layer.dilation}
        if isinstance(layer, nn.Linear):
            return {"kind": "linear"}
        raise TypeError(f"no empty-width stand-in for {type(layer).__name__}")

    def out_shape(self, x: torch.Tensor, channels) -> tuple:
        if self.kind == "linear":
            return (*x.shape[:-1], channels)
        size = []
        for i, extent in enumerate(x.shape[2:]):
            if self.padding == "same":
                size.append(extent)
                continue
            pad = 0 if self.padding == "valid" else self.padding[i]
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            size.append((extent + 2 * pad - span) // self.stride[i] + 1)
        return (x.shape[0], channels, *size)

    def spec(self) -> dict:
        out = {"kind": self.kind}
        if self.kind == "conv":
            out |= {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                    "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                    "dilation": list(self.dilation)}
        return out


class ChannelsCut(_Geometry):
    """A conv/linear whose every output channel was pruned: an empty channel dimension of the right shape."""

    @classmethod
    def replacing(cls, layer: nn.Module) -> "ChannelsCut":
        return cls(**cls.geometry_of(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(self.out_shape(x, 0))

    def spec(self) -> dict:
        return {"type": "ChannelsCut"} | super().spec()


class ConstantChannels(_Geometry):
    """A conv/linear whose every input channel was pruned: its output is its bias, everywhere."""

    def __init__(self, out_channels: int, bias: bool = True, **geometry):
        super().__init__(**geometry)
        self.out_channels = out_channels
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def replacing(cls, layer: nn.Module, out_channels: int, bias: torch.Tensor | None) -> "ConstantChannels":
        """`bias`: the layer's bias sliced to its `out_channels` kept outputs (None without one)."""
        out = cls(out_channels, bias is not None, **cls.geometry_of(layer))
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.out_shape(x, self.out_channels)
        if self.bias is None:
            return x.new_zeros(shape)
        value = self.bias.to(x.dtype)
        return value.view(-1, 1, 1).expand(shape) if self.kind == "conv" else value.expand(shape)

    def spec(self) -> dict:
        return {"type": "ConstantChannels", "out_channels": self.out_channels,
                "bias": self.bias is not None} | super().spec()


STAND_INS = {"ChannelsCut": ChannelsCut, "ConstantChannels": ConstantChannels}
