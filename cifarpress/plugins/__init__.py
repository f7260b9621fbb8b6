"""Trainer plug-ins that are not compression techniques of their own."""
from .ema import WeightEMA

__all__ = ["WeightEMA"]
