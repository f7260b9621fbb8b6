"""The catalogue's `prune` stage: the HESSO or DHSPG plug-in its config's `method` names."""
from __future__ import annotations

from cifarpress.channels.budget import PruneTarget
from cifarpress.techniques.prune.config import DhspgConfig, HessoConfig
from cifarpress.techniques.prune.dhspg import DhspgPruner
from cifarpress.techniques.prune.hesso import HessoPruner
from cifarpress.techniques.prune.pruner import GroupPruner


def prune_target(config: HessoConfig | DhspgConfig) -> PruneTarget:
    return PruneTarget(sparsity=config.sparsity, macs=config.macs, channel_multiple=config.channel_multiple,
                       selection=config.selection, remove_branches=config.remove_branches)


def build(config: HessoConfig | DhspgConfig, context=None) -> GroupPruner:
    if isinstance(config, HessoConfig):
        return HessoPruner(prune_target(config), pruning_periods=config.pruning_periods, saliency=config.saliency,
                           **config.window())
    return DhspgPruner(prune_target(config), lambda_=config.penalty, epsilon=config.epsilon, **config.window())
