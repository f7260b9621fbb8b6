"""Consensus gating (prune: {method: gating}): the gates, the soft MAC budget, the freeze that meets the
target exactly, the cut that equals the gated model, and bad input."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from cifarpress.channels.budget import PruneBudget, PruneTarget
from cifarpress.channels.groups import discover_groups
from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import export_onnx
from cifarpress.models import build_model
from cifarpress.pipeline.recipe import stage_body
from cifarpress.techniques.prune.gates import BANK_NAME, GateHook, attach_gates, bank_of, remove_gates
from cifarpress.techniques.prune.gating import GatingPruner, SoftMacs
from cifarpress.train.trainer import Plugin, TrainConfig, Trainer

from test_prune_groups import realistic


@pytest.fixture(scope="module")
def data(tiny_cifar_root):
    return (load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False),
            load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False))


def fit(pruner, data, epochs=2, steps=5, model=None, plugins=()):
    torch.manual_seed(0)
    model = model or realistic(build_model("resnet20", 10))
    config = TrainConfig(epochs=epochs, batch_size=20, lr=0.05, max_steps_per_epoch=steps, eval_batch_size=100)
    trainer = Trainer(model, config, [pruner, *plugins], device=torch.device("cpu"), quiet=True)
    return trainer.fit(data[0], data[1])


def test_soft_macs_equal_the_exact_counter_on_hard_masks_and_count_input_coupling():
    model = build_model("resnet20", 10)
    groupset = discover_groups(model)
    budget = PruneBudget(model, groupset, PruneTarget(macs=0.5, channel_multiple=1, remove_branches=True))
    soft = SoftMacs(budget.mac_counter)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        cut = torch.randperm(len(groupset), generator=generator)[:len(groupset) // 3].tolist()
        keep = torch.ones(len(groupset))
        keep[cut] = 0
        assert float(soft(keep)) == pytest.approx(budget.compact_macs(cut) / budget.mac_counter.full, rel=1e-6)
    # a conv whose input and output both halve keeps a quarter of its products, not half
    keep = torch.full((len(groupset),), 0.5, requires_grad=True)
    ratio = soft(keep)
    assert float(ratio.detach()) < 0.5
    ratio.backward()
    assert (keep.grad > 0).all()  # every group's gate costs MACs


def test_open_gates_change_nothing_and_closed_gates_equal_zeroed_groups():
    torch.manual_seed(0)
    model = realistic(build_model("resnet20", 10)).eval()
    groupset = discover_groups(model)
    gated = copy.deepcopy(model)
    bank = attach_gates(gated, groupset, branches=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gated(x), model(x))
        cut = [g.id for g in groupset.groups[::3]]
        bank.logits[cut] = -3.0
        zeroed = copy.deepcopy(model)
        groupset.zero_groups(zeroed, cut)
        assert torch.allclose(gated(x), zeroed(x), atol=1e-5)
    # every hook sits after a BatchNorm (ResNet groups all have one) and a deepcopy binds to its own bank
    hooked = [m for m in gated.modules() for h in m._forward_hooks.values() if isinstance(h, GateHook)]
    assert hooked and all(isinstance(m, nn.BatchNorm2d) for m in hooked)
    twin = copy.deepcopy(gated)
    hook = next(h for m in twin.modules() for h in m._forward_hooks.values() if isinstance(h, GateHook))
    assert hook.bank is bank_of(twin) and hook.bank is not bank
    remove_gates(twin)
    assert bank_of(twin) is None and not any(isinstance(h, GateHook) for m in twin.modules()
                                             for h in m._forward_hooks.values())


def test_chunk_gates_close_only_widths_the_cut_keeps():
    """One gate per step between allowed widths: whatever the gates close is a cut the budget allows,
    so the MACs the soft gates count are the compact model's."""
    model = build_model("resnet20", 10)
    groupset = discover_groups(model)
    budget = PruneBudget(model, groupset, PruneTarget(macs=0.5, channel_multiple=8, remove_branches=True))
    chunks = budget.gate_chunks(torch.rand(len(groupset), generator=torch.Generator().manual_seed(1)))
    assert {len(c) for c in chunks} == {8}  # ResNet-20's widths 16/32/64 in steps of 8
    bank = attach_gates(model, groupset, branches=True, chunks=chunks)
    assert len(bank.logits) == len(chunks) < len(groupset) // 4
    never = sorted(set(range(len(groupset))) - {g for c in chunks for g in c})
    assert never and (bank.probs()[never] > 0.9).all()  # the stream's last 8 channels have no gate to close
    soft = SoftMacs(budget.mac_counter)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bank.branch_logits.fill_(9.0)
        for _ in range(5):
            bank.logits.copy_(torch.where(torch.rand(len(chunks), generator=generator) < 0.4, -9.0, 9.0))
            keep = bank.probs()
            closed = (keep <= 0.5).nonzero().flatten().tolist()
            assert closed and budget.levelled(closed) == closed
            assert float(soft(keep)) == pytest.approx(budget.compact_macs(closed) / budget.mac_counter.full,
                                                      abs=1e-3)


def test_dynamic_heads_open_and_close_whole_chunks_per_sample():
    model = build_model("resnet20", 10)
    groupset = discover_groups(model)
    budget = PruneBudget(model, groupset, PruneTarget(macs=0.5, channel_multiple=8, remove_branches=True))
    chunks = budget.gate_chunks(torch.zeros(len(groupset)))
    bank = attach_gates(model, groupset, dynamic=True, branches=True, chunks=chunks)
    assert bank.heads
    with torch.no_grad():
        for head in bank.heads.values():
            head[2].bias.normal_(0, 3)  # a per-sample term that differs between chunks
            head[2].weight.normal_(0, 1)
    model.train()(torch.randn(6, 3, 32, 32))
    chunk_of = bank.chunk_of
    for ids, p in bank.samples:
        for c in chunk_of[ids].unique():
            same = p[:, chunk_of[ids] == c]
            assert torch.equal(same, same[:, :1].expand_as(same))  # one value per chunk and sample ...
        assert not torch.equal(p, p[:1].expand_as(p))  # ... that differs between samples


def test_branch_gates_close_whole_blocks():
    model = build_model("resnet20", 10)
    groupset = discover_groups(model)
    bank = attach_gates(model, groupset, branches=True)
    assert len(bank.branch_logits) == 9  # one per residual block
    with torch.no_grad():
        bank.branch_logits[0] = -5.0
    probs = bank.probs()
    inner = [g.id for g in groupset.groups if g.channels[0][0] == sorted(groupset.removable_spaces)[0]]
    assert (probs[inner] < 0.01).all() and (probs.sum() > 0.9 * (len(groupset) - len(inner)))


@pytest.mark.parametrize("gates", ["static", "dynamic"])
def test_one_pass_meets_the_target_exactly_and_cuts_to_the_gated_function(gates, data):
    target = PruneTarget(macs=0.5, channel_multiple=4, remove_branches=True)
    pruner = GatingPruner(target, gates=gates, end_fraction=0.6)
    result = fit(pruner, data)
    budget = pruner.budget
    kept = budget.compact_macs(pruner.pruned_ids)
    assert kept <= budget.goal_macs  # met ...
    # ... exactly: giving back any one chunk of the cut would miss the target
    assert budget.select(torch.zeros(len(pruner.groupset)), pruner.pruned_ids) == pruner.pruned_ids
    compact = result.model
    assert bank_of(compact) is None and not any(isinstance(h, GateHook) for m in compact.modules()
                                                for h in m._forward_hooks.values())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in build_model("resnet20").parameters())
    assert {"gate_sparsity", "gate_polarization", "macs_kept"} <= result.history[-1].keys()
    assert result.history[-1]["macs_kept"] == pytest.approx(kept / budget.mac_counter.full)


def test_the_frozen_gated_model_equals_the_compact_one_and_onnx_holds_no_gate(data, tmp_path):
    pruner = GatingPruner(PruneTarget(sparsity=0.4, channel_multiple=1), end_fraction=0.5)
    torch.manual_seed(0)
    model = realistic(build_model("resnet20", 10))
    config = TrainConfig(epochs=2, batch_size=20, lr=0.05, max_steps_per_epoch=4, eval_batch_size=100)
    trainer = Trainer(model, config, [pruner], device=torch.device("cpu"), quiet=True)
    result = trainer.fit(data[0], None)
    # finalize removed the gates from the live model too; put the frozen mask back on a copy to compare
    live = copy.deepcopy(trainer.model).eval()
    bank = attach_gates(live, pruner.groupset)
    bank.frozen.fill_(True)
    bank.keep[pruner.pruned_ids] = False
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert (live(x) - result.model.eval()(x)).abs().max() <= 1e-4
    spec = dataset_spec("cifar10")

    def ops(model, name):
        path = export_onnx(model, tmp_path / name, spec, data[1].classes)
        return sorted(node.op_type for node in onnx.load(str(path)).graph.node)

    # no gate op reaches the graph: the same ops as the plain ResNet-20 (no branch went whole here)
    assert ops(result.model, "gated.onnx") == ops(build_model("resnet20", 10), "plain.onnx")


def test_gate_losses_drive_the_soft_budget_to_the_target(data):
    """With the gates' losses only (no label loss), the soft MACs move from 1 to the target."""
    pruner = GatingPruner(PruneTarget(macs=0.6, channel_multiple=1), end_fraction=1.0, gate_lr=0.05,
                          polarization_weight=0.0)

    class NoLabels(Plugin):
        label_weight = 0.0

    fit(pruner, data, epochs=1, steps=40, plugins=[NoLabels()])
    ratio = float(SoftMacs(pruner.budget.mac_counter)(pruner.bank.probs().detach()))
    assert ratio < 0.8  # started at sigmoid(3) ~ 0.95 of every group, i.e. ~0.9 of the MACs


def test_bad_input_gets_one_line(data):
    with pytest.raises(CifarpressError, match="budget_weight must be a number >= 0"):
        GatingPruner(PruneTarget(macs=0.5), budget_weight=-1.0)
    with pytest.raises(ValidationError, match="polarization_weight"):
        stage_body("prune", method="gating", macs=0.5, polarization_weight=-0.1)
    # a target the gates cannot reach
    with pytest.raises(CifarpressError, match="out of reach"):
        fit(GatingPruner(PruneTarget(macs=0.01, channel_multiple=8)), data, epochs=1, steps=1)
    # a model with no prunable group
    only_linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(CifarpressError, match="no prunable channel group"):
        fit(GatingPruner(PruneTarget(sparsity=0.5)), data, epochs=1, steps=1, model=only_linear)
    # gates on a model that already carries them
    gated = build_model("resnet20", 10)
    attach_gates(gated, discover_groups(gated))
    with pytest.raises(CifarpressError, match="already carries gates"):
        fit(GatingPruner(PruneTarget(sparsity=0.5)), data, epochs=1, steps=1, model=gated)
    assert BANK_NAME == "cifarpress_gates"


def test_gating_ternary_and_kd_in_one_pass(data):
    """One Trainer run gates, ternarizes and distills: the hand-on is compact and ternary, its cut exact."""
    from cifarpress.techniques.distill.plugin import Distillation
    from cifarpress.techniques.quantize.qat import TernaryQAT
    from cifarpress.techniques.quantize.ternary import quantized_layers

    torch.manual_seed(0)
    teacher = realistic(build_model("resnet20", 10)).eval()
    pruner = GatingPruner(PruneTarget(macs=0.6, channel_multiple=4, remove_branches=True), end_fraction=0.5)
    result = fit(pruner, data, epochs=2, steps=5, model=copy.deepcopy(teacher),
                 plugins=[TernaryQAT(), Distillation(copy.deepcopy(teacher))])
    compact = result.model.eval()
    kept = pruner.budget.compact_macs(pruner.pruned_ids)
    assert kept <= pruner.budget.goal_macs and bank_of(compact) is None
    layers = quantized_layers(compact)
    assert layers and all(layer.ternary for name, layer in layers.items() if name not in ("conv1", "fc"))
    for layer in layers.values():
        if layer.ternary:
            assert set(layer.weight_codes().unique().tolist()) <= {-1, 0, 1}
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in teacher.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(compact(x)).all()
