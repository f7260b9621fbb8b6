"""Structured pruning: zero-invariant group discovery (groups), physical channel surgery (surgery),
prune targets and budgets (targets), and the HESSO / DHSPG Trainer plug-ins (hesso, dhspg)."""
from .dhspg import DhspgPruner
from .groups import GroupSet, ParamRole, ParamSlice, SpaceInfo, UnsupportedOpWarning, ZIG, discover_groups
from .hesso import HessoPruner
from .surgery import compact_model, round_kept, verify_compact
from .targets import PruneBudget, PruneTarget

__all__ = [
    "DhspgPruner", "GroupSet", "HessoPruner", "ParamRole", "ParamSlice", "PruneBudget", "PruneTarget",
    "SpaceInfo", "UnsupportedOpWarning", "ZIG", "compact_model", "discover_groups", "round_kept",
    "verify_compact",
]
