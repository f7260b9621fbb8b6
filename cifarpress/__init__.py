"""cifarpress: compress CIFAR-10/100 classifiers (and your own) for edge deployment.

The Python API, one function per stage, on your model and your data (docs/api.md lists every name):

    import cifarpress
    small = cifarpress.prune(model, train_loader, macs=0.5, epochs=10)
    out = cifarpress.export(small, "small.int8.onnx", precision="int8", data=test_loader,
                            calibration=train_loader)
    cifarpress.bench(out.path, test_loader)

Names load on first use (PEP 562), so `import cifarpress` and the command line's `--help` stay free of torch.
`train` and `export` are also the names of subpackages (the training loop, the exporters); those two
packages are made callable, so `cifarpress.export(...)` runs the API function while `cifarpress.export.onnx`
stays the module it always was.
"""
from __future__ import annotations

import importlib
import inspect
import types

from cifarpress.version import __version__

_API = "cifarpress.pipeline.api"


class _CallablePackage(types.ModuleType):
    """A subpackage that is also the API function of its name: calling it calls cifarpress.pipeline.api's."""

    def __call__(self, *args, **kwargs):
        return self._function()(*args, **kwargs)

    def _function(self):
        return getattr(importlib.import_module(_API), self.__name__.rpartition(".")[2])

    @property
    def __signature__(self) -> inspect.Signature:  # what inspect.signature and notebooks show
        return inspect.signature(self._function())


for _package in ("train", "export"):  # their __init__ files are empty: importing them costs nothing
    importlib.import_module(f"cifarpress.{_package}").__class__ = _CallablePackage

# public name -> the module that defines it (the API itself is cifarpress.pipeline.api)
_EXPORTS = {
    **dict.fromkeys(("train", "prune", "quantize", "distill", "run_stage", "stage_config", "evaluate", "export",
                     "bench", "compare", "Exported"), "cifarpress.pipeline.api"),
    "run_recipe": "cifarpress.pipeline.compress",
    "TrainResult": "cifarpress.train.trainer",
    "Plugin": "cifarpress.train.trainer",
    "TrainingOptions": "cifarpress.train.options",
    "HessoConfig": "cifarpress.techniques.prune.config",
    "DhspgConfig": "cifarpress.techniques.prune.config",
    "GatingConfig": "cifarpress.techniques.prune.config",
    "TernaryQuantConfig": "cifarpress.techniques.quantize.config",
    "DistillConfig": "cifarpress.techniques.distill.config",
    "MesaConfig": "cifarpress.techniques.mesa.config",
    "CifarpressError": "cifarpress.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'cifarpress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
