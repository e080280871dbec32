"""Register the ``"PATCHER"`` peft type with stock peft, without modifying peft.

``peft.register_peft_method`` only accepts members of its ``PeftType`` enum, which cannot be extended. ``PeftType``
is a ``str`` enum and every lookup goes through dicts keyed by ``config.peft_type``, so writing the plain string key
into those dicts is enough (and is what peft's own model-card code supports since huggingface/peft#2635).
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PATCHER, PatcherConfig
from .model import PatcherModel


def register() -> None:
    """Idempotently make peft aware of PatcherConfig/PatcherModel; runs on ``import transformer_patcher``."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PATCHER) is PatcherModel:
        return
    clash = [t for t, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items() if prefix == PatcherModel.prefix and t != PATCHER]
    if clash:
        raise RuntimeError(f"peft type {clash[0]} already uses the parameter prefix {PatcherModel.prefix!r}")
    PEFT_TYPE_TO_CONFIG_MAPPING[PATCHER] = PatcherConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PATCHER] = PatcherModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PATCHER] = PatcherModel.prefix
