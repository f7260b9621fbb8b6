"""Where a plug-in acts within one training pass; the Trainer runs plug-ins in this order.

The order is forced by what each kind of technique needs to see: a pruner or gate reshapes
the model first; a quantizer then swaps layers of the (possibly reshaped) model; a loss term
(distillation) sees the quantized model's logits; an average of weights (EMA) copies the
model after all of these changed it; a memory saver wraps the forward last, around everything.
Torch-free, so configs and the technique catalogue can import it.
"""
from __future__ import annotations

from enum import IntEnum


class Phase(IntEnum):
    RESHAPE = 10   # pruning, gating: which channels exist
    QUANTIZE = 20  # fake-quant layers swapped in
    LOSS = 30      # extra loss terms (distillation)
    AVERAGE = 40   # weight averages (EMA) of the model as the earlier phases left it
    MEMORY = 50    # training-memory savers around the forward (Mesa)
