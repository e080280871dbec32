"""The weight-delta adapter: a PEFT tuner adding a closed-form low-rank ``ΔW = up @ down`` to selected layers.

PMET/MEMIT-style mass editors compute the factors of each edited layer's update in closed form; this adapter only
stores them (never trains them), adds ``x @ (up @ down)ᵀ`` in the forward pass, and merges, unloads, saves and loads
like any peft adapter (peft type ``"DELTA"``).
"""

from transformer_patcher.tuners.delta.config import DELTA, DELTA_DTYPES, DeltaConfig
from transformer_patcher.tuners.delta.layer import DeltaLayer
from transformer_patcher.tuners.delta.model import DeltaModel, get_delta_model
from transformer_patcher.tuners.registration import register_peft_type

register_peft_type(DELTA, DeltaConfig, DeltaModel)

__all__ = ["DELTA", "DELTA_DTYPES", "DeltaConfig", "DeltaLayer", "DeltaModel", "get_delta_model"]
