"""Knowledge distillation: logit losses (KD, DKD, NKD), a FitNets feature hint, and the Trainer plug-in."""
from .losses import OutputHook, dkd_loss, feature_loss, hint_projector, kd_loss, nkd_loss
from .plugin import Distillation, load_teacher

__all__ = ["Distillation", "OutputHook", "dkd_loss", "feature_loss", "hint_projector", "kd_loss", "load_teacher",
           "nkd_loss"]
