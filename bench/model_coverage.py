"""Any-model coverage (issue 25): channel groups, cuts, HESSO and exports on timm models, beside Torch-Pruning.

    python bench/model_coverage.py [--models efficientnet_b0,dla34] [--skip-hesso] [--skip-export]
                                   [--skip-tp] [--threads 1] [--out PATH]

Models (timm.create_model(name, pretrained=False, num_classes=10), 3x32x32 inputs, eval mode unless a step
says otherwise), made to look trained (trained_looking: constant-initialised norm weights and biases,
zero-initialised last BNs and 1e-6 layer scales drawn at random, BN statistics estimated on random
images, so that no cut is exact by luck): efficientnet_b0, mobilenetv3_small_100, ghostnet_050, regnetx_002,
densenet121, repvgg_a0, seresnet18, convnext_atto, resnet50d, dla34. Each step of each model runs in its
own try/except: a failure is recorded as one line (exception type and message) plus the innermost frame
in cifarpress / torch_pruning / timm, and the run goes on. Per model:

  groups      cifarpress.channels.groups.discover_groups(model, 2 random images) on the model in eval
              mode: groups, channel spaces (prunable ones), prunable channel share = prunable channels /
              all channels over every space (network input and output spaces included), the
              UnsupportedOpWarning messages (first 5, and how many).
  discovery   whether discovery left the model as it was, twice: the eval-mode call above, and a call on
              the model in train mode with the default probe (what the prune stage does at setup):
              state-dict buffers (BN running stats, ...) and parameters compared bit for bit, training
              flags, and the eval outputs on the probe batch before and after.
  cifarpress  40% group sparsity, picked by cifarpress.channels.budget (PruneBudget with
              PruneTarget(sparsity=0.4, channel_multiple=1), the groups' L2 norms
              (GroupSet.group_norms) as the score), two rules: "uniform" (every unit cut by a common
              fraction, lowest norms inside a unit: the closest to Torch-Pruning's per-layer ratio,
              the headline) and "score" (the globally lowest-norm chunks). The groups are zeroed
              (GroupSet.zero_groups) on a copy, cut out (cifarpress.channels.surgery.compact_model),
              MACs of compact / original (cifarpress.profile.profile_model, the MAC counter
              PruneBudget uses too), and exactness = max |compact - zeroed| / max |zeroed| over the
              logits of a probe batch of 4 random images, eval mode. Exact: <= 1e-4 (the issue's bar).
  torch-pruning  tp.pruner.BasePruner (MetaPruner's 1.6 name) with tp.importance.MagnitudeImportance(p=2),
              pruning_ratio=0.4, ignored_layers=[model.get_classifier()], example_inputs 1x3x32x32,
              run as pruner.step(interactive=True) and group.prune() on every group it yields, which
              is what pruner.step() does. Before each group is pruned its items are read: every item
              whose handler is an out-channel pruning function (DG.is_out_channel_pruning_fn: convs'
              and linears' output rows, every norm's and PReLU's per-channel parameters, unwrapped
              parameters such as ConvNeXt's layer scale along TP's pruning dim) names channels that
              TP removes; the same channels, mapped back to the original model's indices (a module
              pruned by several groups, e.g. a BN after a concat, has its indices shift), are set to
              zero in a copy of the original. Exactness = max |TP's pruned model - that zeroed copy| /
              max |zeroed| on the same probe: 0 when the removed channels were truly zero-invariant
              and every reader lost the matching inputs; large where TP cuts a channel that still
              matters once zero (LayerNorm/GroupNorm over channels, a wrong coupling), or cuts indices
              inconsistently. MACs of TP's model / original with the same counter.
  hesso       cifarpress.prune(copy, loader, method="hesso", sparsity=0.4, epochs=1) on a DataLoader of
              160 random 3x32x32 images with random labels in 10 classes, batch 8: 20 steps, the prune
              stage's defaults otherwise (channel_multiple 8, fisher saliency): whether it finishes,
              the MACs it kept, seconds.
  exports     fp32: cifarpress.export(model, .onnx, input_shape, data = the random loader, 32 check
              images); int8: the same with precision="int8", calibration on 64 of those images;
              ternary: cifarpress.quantize(copy, loader, method="ternary", epochs=1,
              max_steps_per_epoch=4) then cifarpress.export of the fake-quantized model (QDQ graph +
              packed file), with the number of conv/linear layers the ternary swap left float
              (a subclass such as timm's Linear is not swapped). All on the unpruned model, so an
              export failure does not depend on the tracer. Files go to a temporary folder.

Torch-Pruning and timm are installed for this benchmark only, never into the project's dependencies:
`pip install --no-deps --target bench/.deps/site timm==1.0.31 torch-pruning==1.6.1` (done by the script
when the folder lacks those versions; bench/.deps/ is gitignored), and bench/.deps/site goes first on
sys.path. timm's other requirements: torch, pyyaml, numpy and pillow are in the project's venv already;
huggingface_hub and safetensors are needed only to download pretrained weights (timm imports them
lazily) and are not installed. torchvision has no CPU build for this torch here, and timm imports it at
import time (timm.layers: torchvision.ops.misc.FrozenBatchNorm2d; timm.data: torchvision.transforms,
.transforms.functional.InterpolationMode, .datasets), so when no real torchvision is importable the
script writes a shim, bench/.deps/shim/torchvision/__init__.py, and appends its folder to sys.path:
every torchvision.* module resolves to a placeholder whose every name is a placeholder class (it can be
subclassed, compared and has attributes, e.g. InterpolationMode.BILINEAR; calling one raises
RuntimeError), except torchvision.models, which stays absent so timm's fx feature-extraction helpers
see ImportError and switch themselves off. None of the benchmarked models calls torchvision.

Writes bench/results/model_coverage.json (with --models or a --skip option:
bench/results/model_coverage-partial.json unless --out says otherwise) after every model, with the
versions of timm, torch-pruning and torch, the CPU's SIMD flags, the command and the machine record
(bench/harness.py), and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from harness import PROCESS_STARTED_AT, machine, write_results  # bench/harness.py: a script's own folder is on sys.path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEPS = HERE / ".deps"
TIMM_VERSION = "1.0.31"
TP_VERSION = "1.6.1"
MODELS = ("efficientnet_b0", "mobilenetv3_small_100", "ghostnet_050", "regnetx_002", "densenet121", "repvgg_a0",
          "seresnet18", "convnext_atto", "resnet50d", "dla34")
SPARSITY = 0.4
EXACT = 1e-4  # relative: max |compact - zeroed| / max |logit|
NUM_CLASSES = 10
HESSO_STEPS, BATCH = 20, 8

SHIM = '''"""Import shim written by bench/model_coverage.py: this is NOT torchvision.

timm imports torchvision names at import time that the benchmarked models never call. Every
torchvision.* module resolves to a placeholder; every name in it is a placeholder class (subclassable,
comparable, with attributes such as InterpolationMode.BILINEAR); calling one raises RuntimeError.
torchvision.models stays absent (ImportError), so timm switches its fx feature extraction off.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+model-coverage-shim"
_ABSENT = ("torchvision.models",)


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision shim: {cls.__qualname__} is not available (torchvision is not installed)")


_STUBS = {}


def _stub(qualname):
    if qualname not in _STUBS:
        _STUBS[qualname] = _StubMeta(qualname.rpartition(".")[2], (), {"__qualname__": qualname})
    return _STUBS[qualname]


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("torchvision."):
            return None
        if any(fullname == a or fullname.startswith(a + ".") for a in _ABSENT):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.meta_path.append(_Finder())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _stub(f"torchvision.{name}")
'''


# -- the benchmark's own dependencies -------------------------------------------------------------

def _installed(site: Path, dist: str) -> str | None:
    found = [d.version for d in importlib.metadata.distributions(path=[str(site)])
             if (d.metadata["Name"] or "").lower().replace("_", "-") == dist]
    return found[0] if found else None


def ensure_deps(deps: Path = DEPS) -> dict:
    """timm and Torch-Pruning in deps/site (pip --no-deps --target), the torchvision shim if needed; on sys.path."""
    site = deps / "site"
    wanted = {"timm": TIMM_VERSION, "torch-pruning": TP_VERSION}
    missing = [f"{name}=={version}" for name, version in wanted.items() if _installed(site, name) != version]
    if missing:
        print(f"installing {', '.join(missing)} into {site} (for this benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                        str(site), *missing], check=True)
    sys.path.insert(0, str(site))
    shim = None
    if importlib.util.find_spec("torchvision") is None:
        shim_dir = deps / "shim"
        init = shim_dir / "torchvision" / "__init__.py"
        if not init.is_file() or init.read_text() != SHIM:
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(SHIM)
        sys.path.append(str(shim_dir))
        shim = str(init.relative_to(HERE.parent))
    return {"site": str(site.relative_to(HERE.parent)), "torchvision_shim": shim,
            **{name: _installed(site, name) for name in wanted}}


# -- helpers --------------------------------------------------------------------------------------

def one_line(exc: BaseException) -> dict:
    """The error as one line, and the innermost frame in cifarpress / torch_pruning / timm that raised it."""
    text = str(exc).strip().splitlines()
    record = {"error": f"{type(exc).__name__}: {text[0] if text else ''}"[:400]}
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        match = re.search(r"(cifarpress|torch_pruning|timm)/(.*)$", frame.filename)
        if match:
            record["where"] = f"{match.group(1)}/{match.group(2)}:{frame.lineno} in {frame.name}"
            break
    if frames:
        last = frames[-1]
        record["raised_at"] = f"{Path(last.filename).name}:{last.lineno} in {last.name}"
    return record


class Step:
    """Run one step of one model: its fields, seconds, a one-line error, and cifarpress's warnings."""

    def __init__(self, row: dict, name: str):
        self.row, self.name = row, name
        self.record: dict = {}

    def __enter__(self) -> dict:
        self.t0 = time.perf_counter()
        self._warnings = warnings.catch_warnings(record=True)
        self.caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self.record

    def __exit__(self, kind, exc, tb) -> bool:
        self._warnings.__exit__(None, None, None)
        from cifarpress.channels.groups import UnsupportedOpWarning

        unsupported = list(dict.fromkeys(str(w.message) for w in self.caught
                                         if issubclass(w.category, UnsupportedOpWarning)))
        other = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in self.caught
                                   if not issubclass(w.category, UnsupportedOpWarning) and "cifarpress" in w.filename))
        if unsupported:
            self.record["unsupported_op_warnings"] = {"count": len(unsupported), "first": unsupported[:5]}
        if other:
            self.record["cifarpress_warnings"] = {"count": len(other), "first": [m[:300] for m in other[:3]]}
        self.record["ok"] = exc is None
        if exc is not None:
            self.record.update(one_line(exc))
        self.record["seconds"] = round(time.perf_counter() - self.t0, 2)
        self.row[self.name] = self.record
        if exc is not None and not isinstance(exc, Exception):  # KeyboardInterrupt and the like
            return False
        return True


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out = model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return out[0] if isinstance(out, (tuple, list)) else out


def relative_diff(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    ref = logits(reference, x)
    return float((logits(model, x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "buffers": {k for k, _ in model.named_buffers()},
            "training": [m.training for m in model.modules()]}


def changes(model: nn.Module, before: dict, x: torch.Tensor, logits_before: torch.Tensor) -> dict:
    after = model.state_dict()
    changed = [k for k, v in before["state"].items() if k not in after or not torch.equal(v, after[k])]
    buffers = [k for k in changed if k in before["buffers"]]
    out = logits(model, x)
    return {"buffers_total": len(before["buffers"]), "buffers_changed": len(buffers),
            "buffers_changed_first": buffers[:5], "params_changed": len(changed) - len(buffers),
            "training_flags_changed": sum(a != m.training for a, m in zip(before["training"], model.modules())),
            "eval_output_max_abs_change": float((out - logits_before).abs().max()),
            "unchanged": not changed and bool(torch.equal(out, logits_before))
            and all(a == m.training for a, m in zip(before["training"], model.modules()))}


def macs(model: nn.Module, x1: torch.Tensor) -> int:
    from cifarpress.profile import profile_model

    return profile_model(model, example_input=x1).macs


@torch.no_grad()
def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a freshly initialised model the per-channel state a trained one has, so that no cut is exact by luck.

    timm starts norms at weight 1 / bias 0, the last BN of each residual branch at weight 0
    (zero_init_last: the branch outputs 0 whatever its inner channels hold) and ConvNeXt's layer
    scale at 1e-6: a wrong cut inside such a branch would not move the logits. Every 1-D parameter
    that holds one constant value is drawn at random (biases N(0, 0.2^2), scales U(0.5, 1.5)); then the
    BatchNorm running statistics are estimated on 4 batches of 16 random images (train-mode forwards,
    cumulative average), and the model is put in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and p.numel() > 1 and bool((p == p[0]).all()):
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momentum = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for _ in range(4):
        model(torch.randn(16, 3, 32, 32, generator=g))
    for m, mom in zip(norms, momentum):
        m.momentum = mom
    return model.eval()


def random_loader(images: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(images, 3, 32, 32, generator=g),
                                          torch.randint(0, NUM_CLASSES, (images,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def conv_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def out_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear, by name."""
    return {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for n, m in conv_linear_layers(model).items()}


def width_gaps(original: dict, ours: dict, theirs: dict, limit: int = 10) -> dict:
    """Layers whose kept share of output channels differs by more than 0.15 between the two cuts."""
    gaps = []
    for name, full in original.items():
        a, b = ours.get(name), theirs.get(name)
        if a is not None and b is not None and abs(a - b) > 0.15 * full:
            gaps.append({"layer": name, "original": full, "cifarpress": a, "torch_pruning": b})
    return {"count": len(gaps), "first": gaps[:limit]}


def type_name(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


# -- Torch-Pruning: prune, and zero the same channels in a copy of the original ---------------------

def torch_pruning_cut(tp, model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, nn.Module, dict]:
    """(TP's pruned model, the original with the channels TP removed set to zero, notes)."""
    pruned, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    module_name = {m: n for n, m in pruned.named_modules()}
    param_name = {p: n for n, p in pruned.named_parameters()}
    classifier = pruned.get_classifier()
    pruner = tp.pruner.BasePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=SPARSITY, ignored_layers=[classifier])
    unwrapped_dim = {p: dim for p, dim in pruner.DG.unwrapped_parameters}
    zero_params = dict(zeroed.named_parameters())
    alive: dict[tuple[str, int], list[int]] = {}  # (param, dim) -> original index at each current position
    notes = {"groups": 0, "skipped_items": []}

    def zero(pname: str, dim: int, idxs) -> None:
        p = zero_params[pname]
        key = (pname, dim)
        if key not in alive:
            alive[key] = list(range(p.shape[dim]))
        positions = alive[key]
        original = [positions[i] for i in idxs]
        with torch.no_grad():
            p.index_fill_(dim, torch.tensor(original, dtype=torch.long), 0.0)
        removed = set(idxs)
        alive[key] = [o for i, o in enumerate(positions) if i not in removed]

    for group in pruner.step(interactive=True):
        notes["groups"] += 1
        for dep, idxs in group:
            if not pruner.DG.is_out_channel_pruning_fn(dep.handler) or not len(idxs):
                continue
            target = dep.target.module
            idxs = [int(i) for i in idxs]
            if isinstance(target, nn.Parameter):
                zero(param_name[target], unwrapped_dim[target], idxs)
                continue
            name = module_name.get(target)
            if name is None:  # TP's own op nodes (concat, split, ...) hold no parameters
                continue
            if isinstance(target, nn.modules.conv._ConvNd):
                dims = {"weight": 1 if target.transposed else 0, "bias": 0}
            elif isinstance(target, nn.Linear):
                dims = {"weight": 0, "bias": 0}
            else:  # norms, PReLU, ...: per-channel vectors
                dims = {pn: 0 for pn, _ in target.named_parameters(recurse=False)}
            for pn, dim in dims.items():
                p = getattr(target, pn, None)
                if not isinstance(p, torch.Tensor) or p.dim() <= dim:
                    continue
                full = f"{name}.{pn}" if name else pn
                if full not in zero_params:
                    continue
                size = len(alive.get((full, dim), range(zero_params[full].shape[dim])))
                if p.shape[dim] != size:  # not the coordinates TP's indices refer to
                    notes["skipped_items"].append(f"{full} dim {dim}")
                    continue
                zero(full, dim, idxs)
        group.prune()
    notes["skipped_items"] = notes["skipped_items"][:5]
    return pruned, zeroed, notes


# -- one model ------------------------------------------------------------------------------------

def measure(name: str, args, timm, tp) -> dict:
    import cifarpress
    from cifarpress.channels.budget import PruneBudget, PruneTarget
    from cifarpress.channels.groups import discover_groups
    from cifarpress.channels.surgery import compact_model

    row: dict = {"model": name}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    example = torch.randn(2, 3, 32, 32, generator=gen)
    x1 = example[:1]
    probe = torch.randn(4, 3, 32, 32, generator=gen)

    with Step(row, "create") as rec:
        model = trained_looking(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES))
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["macs"] = macs(model, x1)
        rec["classifier"] = type_name(model.get_classifier())
        rec["max_abs_logit"] = float(logits(model, probe).abs().max())
    if not row["create"]["ok"]:
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    full_macs = row["create"]["macs"]
    base_logits = logits(model, probe)

    groupset = None
    with Step(row, "groups") as rec:
        before = snapshot(model)
        groupset = discover_groups(model, example)
        rec["discovery"] = changes(model, before, probe, base_logits)
        spaces = groupset.spaces.values()
        total = sum(s.size for s in spaces)
        prunable = sum(s.prunable_channels for s in spaces)
        rec.update({"groups": len(groupset), "spaces": len(groupset.spaces),
                    "prunable_spaces": len(groupset.prunable_spaces), "channels": total,
                    "prunable_channels": prunable, "prunable_share": prunable / total if total else 0.0,
                    "unprunable_reasons_first": list(dict.fromkeys(groupset.unprunable_spaces.values()))[:8]})

    with Step(row, "discovery_train_mode") as rec:  # the prune stage's setup: model in train mode, default probe
        twin = copy.deepcopy(model).train()
        before = snapshot(twin)
        found = discover_groups(twin)
        rec.update(changes(twin, before, probe, base_logits))
        rec["groups"] = len(found)

    widths = {"original": out_widths(model)}
    for rule in ("uniform", "score"):
        with Step(row, f"cifarpress_{rule}") as rec:
            if groupset is None:
                raise RuntimeError("no groups (discovery failed)")
            budget = PruneBudget(model, groupset, PruneTarget(sparsity=SPARSITY, channel_multiple=1, selection=rule),
                                 x1)
            cut = budget.select(groupset.group_norms(model), set())
            zeroed = copy.deepcopy(model)
            groupset.zero_groups(zeroed, cut)
            compact = compact_model(zeroed, groupset, group_ids=cut)
            rec["groups_cut"] = len(cut)
            rec["macs_kept"] = macs(compact, x1) / full_macs
            rec["budget_macs_kept"] = budget.compact_macs(cut) / full_macs
            rec["rel_diff"] = relative_diff(compact, zeroed, probe)
            rec["exact"] = rec["rel_diff"] <= EXACT
            rec["zeroed_vs_original"] = relative_diff(zeroed, model, probe)  # the cut is not a no-op
            widths[rule] = out_widths(compact)

    if not args.skip_tp:
        with Step(row, "torch_pruning") as rec:
            pruned, zeroed, notes = torch_pruning_cut(tp, model, x1)
            rec["macs_kept"] = macs(pruned, x1) / full_macs
            rec["rel_diff"] = relative_diff(pruned, zeroed, probe)
            rec["exact"] = rec["rel_diff"] <= EXACT
            rec["zeroed_vs_original"] = relative_diff(zeroed, model, probe)
            rec.update(notes)
            if "uniform" in widths:  # where the two cuts' widths part (what a MACs gap is made of)
                rec["width_gaps_vs_cifarpress_uniform"] = width_gaps(widths["original"], widths["uniform"],
                                                                     out_widths(pruned))

    if not args.skip_hesso:
        with Step(row, "hesso") as rec:
            small = cifarpress.prune(copy.deepcopy(model), random_loader(HESSO_STEPS * BATCH, 2), method="hesso",
                                     sparsity=SPARSITY, epochs=1, quiet=True)
            rec["steps"] = HESSO_STEPS
            rec["macs_kept"] = macs(small, x1) / full_macs

    if not args.skip_export:
        loader = random_loader(64, 3)
        with tempfile.TemporaryDirectory() as tmp:
            with Step(row, "export_fp32") as rec:
                rec["max_abs_logit"] = float(torch.cat([logits(model, x) for x, _ in loader]).abs().max())
                out = cifarpress.export(model, Path(tmp) / f"{name}.onnx", data=loader, check_images=32,
                                        threads=args.threads)
                rec["max_abs_diff"] = out.check.max_abs_diff if out.check else None
            with Step(row, "export_int8") as rec:
                out = cifarpress.export(model, Path(tmp) / f"{name}.int8.onnx", precision="int8", data=loader,
                                        calibration=loader, check_images=32, calib_images=64, threads=args.threads)
                rec["top1_agreement"] = out.check.top1_agreement if out.check else None
                rec["violations"] = out.violations[:3]
            with Step(row, "export_ternary") as rec:
                from cifarpress.techniques.quantize.ternary import quantized_layers

                q = cifarpress.quantize(copy.deepcopy(model), random_loader(4 * BATCH, 4), method="ternary",
                                        epochs=1, max_steps_per_epoch=4, quiet=True)
                layers = conv_linear_layers(model)
                swapped = quantized_layers(q)
                left = [n for n in layers if n not in swapped]
                rec["layers_left_float"] = {"count": len(left), "of": len(layers), "first": left[:5],
                                            "types": sorted({type_name(layers[n]) for n in left})}
                rec["max_abs_logit"] = float(torch.cat([logits(q, x) for x, _ in loader]).abs().max())
                out = cifarpress.export(q, Path(tmp) / f"{name}.ternary.onnx", data=loader, check_images=32,
                                        threads=args.threads)
                rec["max_abs_diff"] = out.check.max_abs_diff if out.check else None
    row["done_when"] = done_when(row)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def done_when(row: dict) -> dict:
    """The issue's bar, per model: None where the step did not run."""
    def ok(step):
        rec = row.get(step)
        return None if rec is None else bool(rec.get("ok"))

    groups, train, cut, theirs = (row.get(k) or {} for k in ("groups", "discovery_train_mode", "cifarpress_uniform",
                                                             "torch_pruning"))
    verdict = {"prune_stage_runs": ok("hesso"),
               "cut_exact": cut.get("exact", False) if cut else None,
               "discovery_keeps_model": bool(groups.get("ok") and groups["discovery"]["unchanged"]
                                             and train.get("ok") and train.get("unchanged"))}
    if cut.get("ok") and theirs.get("ok") and theirs.get("exact"):
        gap = cut["macs_kept"] - theirs["macs_kept"]
        verdict["macs_gap_vs_torch_pruning"] = gap
        verdict["macs_within_0.10"] = abs(gap) <= 0.10
    else:
        verdict["macs_gap_vs_torch_pruning"] = verdict["macs_within_0.10"] = None  # TP failed or cut inexactly
    return verdict


# -- the table ------------------------------------------------------------------------------------

def _cell(step: dict | None, value=None) -> str:
    if step is None:
        return "-"
    if not step.get("ok"):
        return "error"
    return value if value is not None else "ok"


def _cut_cell(step: dict | None) -> tuple[str, str]:
    if step is None or not step.get("ok"):
        return _cell(step), _cell(step)
    return f"{step['macs_kept']:.3f}", f"{step['rel_diff']:.1e} {'exact' if step['exact'] else 'WRONG'}"


def markdown_table(rows: list[dict]) -> str:
    head = ["model", "groups", "prunable", "discovery keeps model (eval / train)", "cifarpress MACs kept",
            "cifarpress rel. diff", "TP MACs kept", "TP rel. diff", "MACs gap", "HESSO 20 steps", "fp32", "int8",
            "ternary"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        g = row.get("groups")
        kept = []
        for step in (g, row.get("discovery_train_mode")):
            info = step.get("discovery", step) if step and step.get("ok") else None
            kept.append("error" if step is not None and info is None else "-" if info is None else
                        "yes" if info["unchanged"] else f"no ({info['buffers_changed']}/{info['buffers_total']} buf)")
        cp_macs, cp_exact = _cut_cell(row.get("cifarpress_uniform"))
        tp_macs, tp_exact = _cut_cell(row.get("torch_pruning"))
        hesso = row.get("hesso")
        gap = (row.get("done_when") or {}).get("macs_gap_vs_torch_pruning")
        gap = "-" if gap is None else f"{gap:+.3f}" + ("" if abs(gap) <= 0.10 else " (> 0.10)")
        lines.append("| " + " | ".join([
            row["model"], _cell(g, str(g["groups"]) if g and g.get("ok") else None),
            _cell(g, f"{100 * g['prunable_share']:.1f}%" if g and g.get("ok") else None),
            " / ".join(kept), cp_macs, cp_exact, tp_macs, tp_exact, gap,
            _cell(hesso, f"ok ({hesso['macs_kept']:.3f} MACs)" if hesso and hesso.get("ok") else None),
            _cell(row.get("export_fp32")), _cell(row.get("export_int8")), _cell(row.get("export_ternary")),
        ]) + " |")
    return "\n".join(lines)


def errors_list(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        for step, rec in row.items():
            if isinstance(rec, dict) and rec.get("ok") is False:
                where = f" [{rec['where']}]" if rec.get("where") else ""
                lines.append(f"- {row['model']} / {step}: {rec['error']}{where}")
    return "\n".join(lines)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx_vnni|avx2)\b", text)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    parser.add_argument("--skip-hesso", action="store_true", help="leave out the 20 HESSO steps")
    parser.add_argument("--skip-export", action="store_true", help="leave out the fp32 / int8 / ternary exports")
    parser.add_argument("--skip-tp", action="store_true", help="leave out Torch-Pruning")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deps", default=str(DEPS), help="where timm, torch-pruning and the shim are installed")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/model_coverage.json, "
                                                    "or model_coverage-partial.json for a subset)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    partial = set(models) != set(MODELS) or args.skip_hesso or args.skip_export or args.skip_tp
    out = Path(args.out) if args.out else RESULTS / (
        "model_coverage-partial.json" if partial else "model_coverage.json")

    deps = ensure_deps(Path(args.deps))
    import timm
    import torch_pruning as tp

    result = {
        "models": [], "sparsity": SPARSITY, "exact_relative": EXACT, "input": [3, 32, 32],
        "num_classes": NUM_CLASSES, "threads": args.threads,
        "skipped": [s for s, on in (("hesso", args.skip_hesso), ("export", args.skip_export),
                                    ("torch_pruning", args.skip_tp)) if on],
        "versions": {"timm": importlib.metadata.version("timm"),
                     "torch-pruning": importlib.metadata.version("torch-pruning"), "torch": torch.__version__},
        "deps": deps, "cpu_flags": cpu_flags(), "machine": machine(),
    }
    t0 = time.perf_counter()
    for name in models:
        print(f"{name} ...", flush=True)
        row = measure(name, args, timm, tp)
        result["models"].append(row)
        failed = [step for step, rec in row.items() if isinstance(rec, dict) and rec.get("ok") is False]
        print(f"{name}: {row['seconds']} s" + (f", errors in {', '.join(failed)}" if failed else ""), flush=True)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_results(out, result, PROCESS_STARTED_AT)
    table = markdown_table(result["models"])
    result["table"] = table
    write_results(out, result, PROCESS_STARTED_AT)
    print()
    print(table)
    errors = errors_list(result["models"])
    if errors:
        print("\nerrors:\n" + errors)
    print(f"\n{result['seconds']} s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
