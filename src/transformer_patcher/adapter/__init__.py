"""The patch adapter: a PEFT tuner that grows Transformer-Patcher neurons in one FFN."""

from .config import OFFICIAL_CODE_VALUE_SCALE, PAPER_VALUE_SCALE, PATCHER, PatcherConfig
from .keys import init_key
from .layer import PatchCapture, PatcherLayer
from .model import PatcherModel, get_patcher_model
from .registration import register
from .registry import ARCHITECTURES, PatchTarget, resolve_patch_target, supported_model_types

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
