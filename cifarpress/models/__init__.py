"""Model zoo: a registry by name, plus a user's own `package.module:factory`."""
from __future__ import annotations

import importlib
import inspect
from functools import partial
from typing import Callable

from torch import nn

from ..errors import CifarpressError
from .mobilenetv2 import CifarMobileNetV2
from .resnet import CifarResNet
from .vgg import CifarVGG
from .wrn import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": partial(CifarResNet, d) for d in (20, 32, 44, 56, 110)},
    "vgg11_bn": partial(CifarVGG, 11),
    "vgg16_bn": partial(CifarVGG, 16),
    "mobilenetv2": CifarMobileNetV2,
    "wrn16_2": partial(WideResNet, 16, 2),
    "wrn40_2": partial(WideResNet, 40, 2),
}


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise CifarpressError(f"model '{spec}' is not of the form package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CifarpressError(f"cannot import '{module_name}' for model '{spec}' ({exc}); check PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CifarpressError(f"'{module_name}' has no callable '{attr}'; give the model as package.module:factory")
    return factory


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """Build a zoo model by name, or call a user factory given as `package.module:factory`."""
    if ":" in arch:
        factory = _import_factory(arch)
        params = inspect.signature(factory).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        model = factory(num_classes=num_classes) if "num_classes" in params or takes_kwargs else factory()
        if not isinstance(model, nn.Module):
            raise CifarpressError(f"'{arch}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch not in MODELS:
        raise CifarpressError(
            f"unknown model '{arch}'; choose one of {', '.join(MODELS)} or give package.module:factory"
        )
    return MODELS[arch](num_classes=num_classes)
