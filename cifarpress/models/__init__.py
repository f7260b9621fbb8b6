"""Model zoo: a registry by name, plus a user's own `package.module:factory`."""
from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Callable

from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.models.mobilenetv2 import CifarMobileNetV2
from cifarpress.models.resnet import CifarResNet
from cifarpress.models.vgg import CifarVGG
from cifarpress.models.wrn import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": partial(CifarResNet, d) for d in (20, 32, 44, 56, 110)},
    "vgg11_bn": partial(CifarVGG, 11),
    "vgg16_bn": partial(CifarVGG, 16),
    "mobilenetv2": CifarMobileNetV2,
    "wrn16_2": partial(WideResNet, 16, 2),
    "wrn40_2": partial(WideResNet, 40, 2),
}


# User factories the user named in this run (recipe model.arch, --arch, --model). A model file only
# records its arch; loading it may call a factory only if the user named that same factory, so a
# planted file cannot pick a function for cifarpress to import and run.
_TRUSTED: ContextVar[frozenset] = ContextVar("cifarpress_trusted_factories", default=frozenset())


@contextmanager
def trusting(*archs: str | None):
    """Within this block, model files may name these user factories (the zoo is always allowed)."""
    token = _TRUSTED.set(_TRUSTED.get() | {a for a in archs if a and ":" in a})
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _debug_hint() -> str:
    return "set CIFARPRESS_DEBUG=1 (or pass --debug) for the traceback"


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise CifarpressError(f"model '{spec}' is not of the form package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CifarpressError(f"cannot import '{module_name}' for model '{spec}' ({exc}); check PYTHONPATH") from exc
    except Exception as exc:  # a syntax error or an exception raised while the module runs
        raise CifarpressError(f"importing '{module_name}' for model '{spec}' failed ({type(exc).__name__}: "
                              f"{_first_line(exc)}); fix that module ({_debug_hint()})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CifarpressError(f"'{module_name}' has no callable '{attr}'; give the model as package.module:factory")
    return factory


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


def build_model(arch: str, num_classes: int = 10, recorded_in: str | None = None) -> nn.Module:
    """Build a zoo model by name, or call a user factory given as `package.module:factory`.

    recorded_in: the model file the name was read from; then a factory runs only if the user
    named it too (see `trusting`), never on the file's word alone."""
    if ":" in arch:
        if recorded_in is not None and arch not in _TRUSTED.get():
            raise CifarpressError(
                f"{recorded_in} names the user factory '{arch}', and model files may name only zoo "
                f"architectures; to run that code, name it yourself: --arch {arch} (recipe: model.arch)")
        factory = _import_factory(arch)
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        try:
            model = factory(num_classes=num_classes) if "num_classes" in params or takes_kwargs else factory()
        except Exception as exc:
            raise CifarpressError(f"model factory '{arch}' failed ({type(exc).__name__}: {_first_line(exc)}); "
                                  f"fix the factory: it is called with num_classes= when it accepts it, else "
                                  f"with no argument ({_debug_hint()})") from exc
        if not isinstance(model, nn.Module):
            raise CifarpressError(f"'{arch}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch not in MODELS:
        raise CifarpressError(
            f"unknown model '{arch}'; choose one of {', '.join(MODELS)} or give package.module:factory"
        )
    return MODELS[arch](num_classes=num_classes)
