"""The patch adapter: a PEFT tuner that grows Transformer-Patcher neurons in one FFN."""

from transformer_patcher.tuners.architectures import (
    ARCHITECTURES,
    PatchTarget,
    resolve_patch_target,
    supported_model_types,
)
from transformer_patcher.tuners.patcher.config import (
    OFFICIAL_CODE_VALUE_SCALE,
    PAPER_VALUE_SCALE,
    PATCHER,
    PatcherConfig,
)
from transformer_patcher.tuners.patcher.keys import init_key
from transformer_patcher.tuners.patcher.layer import PatchCapture, PatcherLayer
from transformer_patcher.tuners.patcher.model import PatcherModel, get_patcher_model, register

register()

__all__ = [
    "ARCHITECTURES",
    "OFFICIAL_CODE_VALUE_SCALE",
    "PAPER_VALUE_SCALE",
    "PATCHER",
    "PatchCapture",
    "PatchTarget",
    "PatcherConfig",
    "PatcherLayer",
    "PatcherModel",
    "get_patcher_model",
    "init_key",
    "register",
    "resolve_patch_target",
    "supported_model_types",
]
