"""The catalogue's `prune` stage: the HESSO, DHSPG or gating plug-in its config's `method` names."""
from __future__ import annotations

from cifarpress.channels.budget import PruneTarget
from cifarpress.techniques.prune.config import DhspgConfig, GatingConfig, HessoConfig
from cifarpress.techniques.prune.dhspg import DhspgPruner
from cifarpress.techniques.prune.gating import GatingPruner
from cifarpress.techniques.prune.hesso import HessoPruner
from cifarpress.techniques.prune.pruner import GroupPruner


def prune_target(config: HessoConfig | DhspgConfig | GatingConfig) -> PruneTarget:
    return PruneTarget(sparsity=config.sparsity, macs=config.macs, channel_multiple=config.channel_multiple,
                       selection=config.selection, remove_branches=config.remove_branches)


def build(config: HessoConfig | DhspgConfig | GatingConfig, context=None) -> GroupPruner:
    if isinstance(config, GatingConfig):
        return GatingPruner(prune_target(config), gates=config.gates, form=config.form,
                            polarization=config.polarization, polarization_weight=config.polarization_weight,
                            polarization_t=config.polarization_t, budget_weight=config.budget_weight,
                            consensus_weight=config.consensus_weight, gate_lr=config.gate_lr,
                            **config.window())
    if isinstance(config, HessoConfig):
        return HessoPruner(prune_target(config), pruning_periods=config.pruning_periods, saliency=config.saliency,
                           **config.window())
    return DhspgPruner(prune_target(config), lambda_=config.penalty, epsilon=config.epsilon, **config.window())
