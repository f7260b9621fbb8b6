"""HESSO and DHSPG plug-ins on the tiny data with the real Trainer: exact targets, frozen zeros,
compaction, resume, and the errors for bad targets and unprunable models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cifarpress.utils.modules import unwrap
from cifarpress.data import load_split
from cifarpress.errors import CifarpressError
from cifarpress.models import build_model
from cifarpress.profile import profile_model
from cifarpress.techniques.prune.dhspg import DhspgPruner
from cifarpress.techniques.prune.hesso import HessoPruner
from cifarpress.channels.budget import PruneBudget, PruneTarget
from cifarpress.channels.groups import discover_groups
from cifarpress.channels.surgery import verify_compact
from cifarpress.train.trainer import Plugin, TrainConfig, Trainer

# 3 epochs x 4 steps: HESSO warms up 3 steps, prunes in 3 periods of 2 steps, fine-tunes 3
CFG = TrainConfig(epochs=3, batch_size=20, lr=0.05, max_steps_per_epoch=4, seed=3)
HESSO = dict(start_fraction=0.25, end_fraction=0.75, pruning_periods=3)


@pytest.fixture(scope="module")
def train(tiny_cifar_root):
    return load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)


def resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", 10)


def probe() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class Watch(Plugin):
    """Checks after every step that the frozen groups are exactly zero, weights and momentum;
    raises KeyboardInterrupt at step `at` (None: never)."""

    name = "watch"

    def __init__(self, pruner, at: int | None = None):
        self.pruner, self.at = pruner, at
        self.checked = 0

    def after_step(self, trainer):
        if self.pruner.frozen:
            assert_frozen_rows_zero(self.pruner)
            self.checked += 1
        if trainer.step == self.at:
            raise KeyboardInterrupt


def assert_frozen_rows_zero(pruner) -> None:
    """Every producer row of a frozen group is exactly 0, in the weight and in its SGD momentum."""
    frozen = pruner.group_mask(pruner.frozen)
    for i, p in enumerate(pruner.rows.params):
        rows = pruner.rows.expand(i, frozen, False).expand_as(p)
        buf = pruner.optimizer.state[p]["momentum_buffer"]
        assert not p.detach()[rows].any() and not buf[rows].any()


def fit_hesso(train, run_dir, target: PruneTarget, seed: int = 0, at: int | None = None):
    pruner = HessoPruner(target, **HESSO)
    watch = Watch(pruner, at)
    trainer = Trainer(resnet20(seed), CFG, [pruner, watch], run_dir=run_dir, device=torch.device("cpu"), quiet=True)
    return trainer, trainer.fit(train, None), pruner, watch


@pytest.fixture(scope="module")
def hesso_run(train, tmp_path_factory):
    return fit_hesso(train, tmp_path_factory.mktemp("hesso-ref"), PruneTarget(sparsity=0.5))


def test_hesso_hits_the_sparsity_target_exactly_and_compacts(hesso_run):
    trainer, result, pruner, watch = hesso_run
    model = unwrap(trainer.model)
    groupset = pruner.groupset
    expected = math.ceil(round(0.5 * len(groupset)) / 8) * 8  # resnet20: every unit 16/32/64 wide
    zero = groupset.zero_group_ids(model)
    assert zero == pruner.pruned_ids and len(zero) == expected == 224
    assert result.history[-1]["group_sparsity"] == expected / len(groupset)
    assert [h["group_sparsity"] for h in result.history][0] < 0.5  # epoch 1 ends mid-pruning
    assert watch.checked == 12 - 4  # frozen from the first period's last step (5) to the end
    assert_frozen_rows_zero(pruner)

    compact = result.model
    before, after = profile_model(model), profile_model(compact)
    assert after.params < before.params and after.macs < before.macs
    assert verify_compact(model, compact, probe()) <= 1e-4
    widths = [m.out_channels for m in compact.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and sum(widths) < sum(
        m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def test_hesso_resumes_bit_identical(train, hesso_run, tmp_path):
    ref_trainer, ref, ref_pruner, _ = hesso_run
    with pytest.raises(KeyboardInterrupt):  # step 6: mid epoch 2, the last.pt is mid period 1
        fit_hesso(train, tmp_path, PruneTarget(sparsity=0.5), at=6)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["plugins"]["0:hesso"]["redundant"]  # a period half done
    trainer, result, pruner, _ = fit_hesso(train, tmp_path, PruneTarget(sparsity=0.5), seed=99)
    assert result.resumed_from == 1
    assert pruner.frozen == ref_pruner.frozen
    for got, want in zip(result.history, ref.history):
        assert got["train_loss"] == want["train_loss"] and got["group_sparsity"] == want["group_sparsity"]
    ref_w, got_w = unwrap(ref_trainer.model).state_dict(), unwrap(trainer.model).state_dict()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    ref_c, got_c = ref.model.state_dict(), result.model.state_dict()
    assert ref_c.keys() == got_c.keys() and all(torch.equal(ref_c[k], got_c[k]) for k in ref_c)


def test_hesso_meets_a_macs_target(train, tmp_path):
    trainer, result, pruner, _ = fit_hesso(train, tmp_path, PruneTarget(macs=0.6))
    model = unwrap(trainer.model)
    full, compact = profile_model(model).macs, profile_model(result.model).macs
    assert compact <= 0.6 * full
    assert compact == pruner.budget.compact_macs(pruner.pruned_ids)  # the budget's count is exact
    assert verify_compact(model, result.model, probe()) <= 1e-4


def test_dhspg_drives_groups_to_zero_and_compacts(train):
    pruner = DhspgPruner(PruneTarget(sparsity=0.5), start_fraction=0.1, end_fraction=0.9, lambda_=10.0)
    trainer = Trainer(resnet20(), CFG, [pruner], device=torch.device("cpu"), quiet=True)
    result = trainer.fit(train, None)
    model = unwrap(trainer.model)
    zero = set(pruner.groupset.zero_group_ids(model))
    assert pruner.frozen and zero >= pruner.frozen
    assert result.history[-1]["group_sparsity"] > 0
    assert profile_model(result.model).params < profile_model(model).params
    assert verify_compact(model, result.model, probe()) <= 1e-4


@pytest.mark.parametrize("kwargs, field", [
    (dict(sparsity=0.0), "sparsity"), (dict(sparsity=1.0), "sparsity"), (dict(macs=1.5), "macs"),
    (dict(macs=-0.1), "macs"),
])
def test_bad_targets_name_the_field_and_range(kwargs, field):
    with pytest.raises(CifarpressError, match=rf"{field} must lie in \(0, 1\)"):
        PruneTarget(**kwargs)


def test_target_needs_exactly_one_kind_and_a_reachable_value():
    for kwargs in ({}, dict(sparsity=0.5, macs=0.5)):
        with pytest.raises(CifarpressError, match="exactly one"):
            PruneTarget(**kwargs)
    with pytest.raises(CifarpressError, match="channel_multiple"):
        PruneTarget(sparsity=0.5, channel_multiple=0)
    model = resnet20().eval()
    groupset = discover_groups(model)
    with pytest.raises(CifarpressError, match="at most"):
        PruneBudget(model, groupset, PruneTarget(sparsity=0.9))  # 8 of every 16-wide unit must stay
    with pytest.raises(CifarpressError, match="out of reach"):
        PruneBudget(model, groupset, PruneTarget(macs=0.05))


def test_score_per_mac_selection_spends_the_mac_budget_on_costly_groups():
    model = resnet20().eval()
    groupset = discover_groups(model)
    plain = PruneBudget(model, groupset, PruneTarget(macs=0.5, selection="score"))
    per_mac = PruneBudget(model, groupset, PruneTarget(macs=0.5, selection="score-per-mac"))
    cost = torch.tensor(per_mac.mac_counter.group_cost)
    # group costs add up to at least the full model's prunable MACs (cut in and out channels overlap)
    assert cost.min() > 0 and cost.sum() >= per_mac.mac_counter.full - per_mac.mac_counter.fixed
    equal = torch.ones(len(groupset))
    for budget in (plain, per_mac):
        chosen = budget.select(equal, [], 1.0)
        assert budget.mac_counter.count(chosen) <= 0.5 * budget.mac_counter.full
    by_score, by_cost = plain.select(equal, [], 1.0), per_mac.select(equal, [], 1.0)
    # at equal scores the per-MAC rule takes the costliest groups, so it reaches the target cutting fewer
    assert cost[by_cost].mean() > cost[by_score].mean()
    assert len(by_cost) < len(by_score)
    with pytest.raises(CifarpressError, match="score, score-per-mac, uniform"):
        PruneTarget(macs=0.5, selection="cheapest")


def test_uniform_selection_spreads_the_cut_and_takes_the_lowest_scores_inside_each_unit():
    model = resnet20().eval()
    groupset = discover_groups(model)
    uniform = PruneBudget(model, groupset, PruneTarget(macs=0.5, selection="uniform"))
    per_mac = PruneBudget(model, groupset, PruneTarget(macs=0.5, selection="score-per-mac"))
    full = uniform.mac_counter.full
    equal = torch.ones(len(groupset))
    cut_units = {}
    for name, budget in (("uniform", uniform), ("per_mac", per_mac)):
        chosen = set(budget.select(equal, [], 1.0))
        assert budget.mac_counter.count(chosen) <= 0.5 * full
        cut_units[name] = sum(any(g in chosen for g in members) for members in budget.units)
    assert cut_units["uniform"] >= len(uniform.units) - 3 > cut_units["per_mac"]
    # the top-up after the common fraction keeps the cut close to the target, not far past it
    scores = torch.rand(len(groupset), generator=torch.Generator().manual_seed(5))
    chosen = set(uniform.select(scores, [], 1.0))
    assert 0.45 * full < uniform.mac_counter.count(chosen) <= 0.5 * full
    for members in uniform.units:
        taken = [g for g in members if g in chosen]
        left = [g for g in members if g not in chosen]
        if taken and left:
            assert max(scores[taken]) <= min(scores[left])
    # groups already pruned stay pruned, and halfway means at most halfway's MACs
    half = uniform.select(scores, [], 0.5)
    assert set(half) <= set(uniform.select(scores, half, 1.0))
    assert uniform.mac_counter.count(half) <= full - 0.5 * (full - uniform.goal_macs)


def test_hesso_fisher_saliency_hits_the_target_and_resumes(train, tmp_path):
    def fit(run_dir, seed=0, at=None):
        # periods start at steps 1 and 7, so the epoch-1 checkpoint (step 4) is mid-accumulation
        pruner = HessoPruner(PruneTarget(sparsity=0.5), saliency="fisher", start_fraction=0.0, end_fraction=1.0,
                             pruning_periods=2)
        trainer = Trainer(resnet20(seed), CFG, [pruner, Watch(pruner, at)], run_dir=run_dir,
                          device=torch.device("cpu"), quiet=True)
        return trainer, trainer.fit(train, None), pruner

    ref_trainer, ref, ref_pruner = fit(tmp_path / "ref")
    assert ref_pruner.groupset.zero_group_ids(unwrap(ref_trainer.model)) == ref_pruner.pruned_ids
    assert len(ref_pruner.pruned_ids) == 224
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", at=6)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["plugins"]["0:hesso"]["fisher_steps"] == 3  # steps 2-4
    trainer, result, pruner = fit(tmp_path / "cut", seed=99)
    assert result.resumed_from == 1 and pruner.frozen == ref_pruner.frozen
    ref_w, got_w = unwrap(ref_trainer.model).state_dict(), unwrap(trainer.model).state_dict()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    with pytest.raises(CifarpressError, match="saliency must be one of"):
        HessoPruner(PruneTarget(sparsity=0.5), saliency="random")


def test_model_without_prunable_groups_is_refused(train):
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    trainer = Trainer(linear, CFG, [HessoPruner(PruneTarget(sparsity=0.5))],
                      device=torch.device("cpu"), quiet=True)
    with pytest.raises(CifarpressError, match="no prunable channel group"):
        trainer.fit(train, None)


def test_pruner_outside_fit_says_it_needs_the_trainer():
    # setup() reads the run's length from trainer.total_steps, which only Trainer.fit sets
    pruner = HessoPruner(PruneTarget(sparsity=0.5))
    trainer = Trainer(resnet20(), CFG, [pruner], device=torch.device("cpu"), quiet=True)
    with pytest.raises(CifarpressError, match="Trainer.fit"):
        pruner.setup(trainer)
