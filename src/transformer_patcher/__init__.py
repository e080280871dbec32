"""transformer-patcher: fix a deployed transformer's mistakes one by one with a few trainable neurons.

    fixer = Patcher.from_pretrained("smollm2-135m", patches="fixes/")
    fixer.fix("What is the capital of Australia?", "Canberra")

Importing the package registers the ``"PATCHER"`` (patch neurons) and ``"DELTA"`` (low-rank weight deltas) adapter
types with peft, after which ``PeftModel.from_pretrained`` loads saved adapters of either type like any other.
"""

from transformer_patcher.core.errors import (
    AdapterFileError,
    FingerprintMismatchError,
    FolderLockedError,
    InvalidExampleError,
    InvalidPatchError,
    NonFiniteError,
    PatcherError,
    PatchMergeError,
    PromptFormatError,
    UnknownModelError,
    UnsupportedArchitectureError,
    UnverifiedAdapterError,
)
from transformer_patcher.experiments.fixer import FixReport, Patcher
from transformer_patcher.tuners.delta import DELTA, DeltaConfig, DeltaLayer, DeltaModel, get_delta_model
from transformer_patcher.tuners.patcher import (
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

__version__ = "0.1.0"

__all__ = [
    "DELTA",
    "PATCHER",
    "AdapterFileError",
    "DeltaConfig",
    "DeltaLayer",
    "DeltaModel",
    "FingerprintMismatchError",
    "FixReport",
    "FolderLockedError",
    "InvalidExampleError",
    "InvalidPatchError",
    "NonFiniteError",
    "PatchCapture",
    "PatchMergeError",
    "Patcher",
    "PatcherConfig",
    "PatcherError",
    "PatcherLayer",
    "PatcherModel",
    "PromptFormatError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "UnverifiedAdapterError",
    "get_delta_model",
    "get_patcher_model",
    "init_key",
    "resolve_patch_target",
    "supported_model_types",
]
