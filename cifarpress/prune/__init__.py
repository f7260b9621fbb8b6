"""Structured pruning: zero-invariant group discovery (groups) and physical channel surgery (surgery)."""
from .groups import GroupSet, ParamRole, ParamSlice, SpaceInfo, UnsupportedOpWarning, ZIG, discover_groups
from .surgery import compact_model, round_kept, verify_compact

__all__ = [
    "GroupSet", "ParamRole", "ParamSlice", "SpaceInfo", "UnsupportedOpWarning", "ZIG",
    "compact_model", "discover_groups", "round_kept", "verify_compact",
]
