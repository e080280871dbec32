"""transformer-patcher: fix a deployed transformer's mistakes one by one with a few trainable neurons.

Importing the package registers the ``"PATCHER"`` adapter type with peft, after which ``PeftModel.from_pretrained``
loads saved patch sets like any other adapter.
"""

from .adapter import (
    PATCHER,
    PatchCapture,
    PatcherConfig,
    PatcherLayer,
    PatcherModel,
    get_patcher_model,
    init_key,
    resolve_patch_target,
    supported_model_types,
)
from .errors import (
    AdapterFileError,
    FingerprintMismatchError,
    InvalidPatchError,
    PatcherError,
    PatchMergeError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

__all__ = [
    "PATCHER",
    "AdapterFileError",
    "FingerprintMismatchError",
    "InvalidPatchError",
    "PatchCapture",
    "PatchMergeError",
    "PatcherConfig",
    "PatcherError",
    "PatcherLayer",
    "PatcherModel",
    "UnsupportedArchitectureError",
    "get_patcher_model",
    "init_key",
    "resolve_patch_target",
    "supported_model_types",
]
