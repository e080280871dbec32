"""Register the package's peft types (``"PATCHER"``, ``"DELTA"``) with stock peft, without modifying peft.

Each tuner's ``model`` module registers its own type when imported (``tuners.patcher.model``, ``tuners.delta.model``),
which the package's ``__init__`` arranges as soon as peft is imported.

``peft.register_peft_method`` only accepts members of its ``PeftType`` enum, which cannot be extended. ``PeftType``
is a ``str`` enum and every lookup goes through dicts keyed by ``config.peft_type``, so writing the plain string key
into those dicts is enough (and is what peft's own model-card code supports since huggingface/peft#2635).
"""

from __future__ import annotations

import warnings

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner


def register_peft_type(peft_type: str, config_cls: type[PeftConfig], tuner_cls: type[BaseTuner]) -> None:
    """Idempotently make peft aware of one config/tuner pair under the plain string ``peft_type``."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is tuner_cls:
        return
    prefix = tuner_cls.prefix
    clash = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != peft_type]
    if clash:
        raise RuntimeError(f"peft type {clash[0]} already uses the parameter prefix {prefix!r}")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


def quiet_peft_wrapping() -> None:
    """peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` on every wrap, so every run would
    print this FutureWarning about code that is neither the user's nor ours; silence exactly that one message."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
