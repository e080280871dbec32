"""``PatcherConfig``: where the patches go, how they compute, and which base model they belong to."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers.activations import ACT2FN

from transformer_patcher.tuners.config_file import (
    NULLABLE_STR,
    STR_LIST,
    AdapterConfig,
    config_schema,
    fingerprint_schema,
)
from transformer_patcher.tuners.patcher.patch_file import validate_adapter_file
from transformer_patcher.tuners.patcher.schema import PATCH_DTYPES
from transformer_patcher.tuners.peft_type import AdapterType

PATCHER = AdapterType.PATCHER

# Values the paper (§4, Appendix) and the official code (patch.py, amplify_con) use to initialise the value scale.
PAPER_VALUE_SCALE = 5.0
OFFICIAL_CODE_VALUE_SCALE = 10.0


@dataclass
class PatcherConfig(AdapterConfig):
    """Configuration of a Transformer-Patcher patch set (peft type ``"PATCHER"``).

    By default the patches extend the last FFN of the model, found through the architecture registry; the resolved
    module names, activation and a fingerprint of the base model are written back into the config so that a saved
    ``adapter_config.json`` describes exactly what it patches and what it may be loaded into.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "The FFN output projection to patch (one module). None: resolve through the registry."},
    )
    key_module: str | None = field(
        default=None,
        metadata={"help": "Full name of the module whose input is the FFN query q. None: resolve with the target."},
    )
    layer_index: int = field(
        default=-1, metadata={"help": "Which block's FFN to patch when resolving through the registry; -1 = last."}
    )
    patch_activation: str | None = field(
        default=None,
        metadata={"help": "Activation of the patch neurons (a transformers ACT2FN name). None: the FFN's own."},
    )
    num_patches: int = field(
        default=0, metadata={"help": "Number of patch neurons; kept in sync with the layer on every change and load."}
    )
    num_trainable_patches: int = field(
        default=0,
        metadata={
            "help": "How many of them are still in training (not yet committed). With num_patches it sizes the layer "
            "on injection, so loaders that fill existing tensors (transformers' load_adapter) find the right shapes."
        },
    )
    init_value_scale: float = field(
        default=OFFICIAL_CODE_VALUE_SCALE,
        metadata={
            "help": "Initial value of the trainable value scale a in v = v' ⊙ a. The paper says 5, the official code "
            "uses 10 (amplify_con); 10 is the default because it is what produced the published results."
        },
    )
    patch_dtype: str | None = field(
        default="float32",
        metadata={"help": "dtype of the patch tensors; fp32 patches on a bf16/fp16 base are fine. None: base dtype."},
    )
    gate_layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder-only models: the block whose output opens each patch's subject gate (negative counts "
            "from the last). A patch with a subject read adds nothing until a position whose output there is "
            "within gate_threshold (cosine) of it has been read. None: no gate, the paper's patches."
        },
    )
    gate_depth: float | None = field(
        default=None,
        metadata={
            "help": "The gate's block as a fraction of the depth, in [0, 1]: block round(gate_depth * (blocks - 1)), "
            "resolved into gate_layer on injection, so one setting serves models of any depth. None: gate_layer "
            "alone decides."
        },
    )
    gate_module: str | None = field(
        default=None, metadata={"help": "Full name of that block; resolved from gate_layer on injection."}
    )
    gate_threshold: float = field(
        default=0.8, metadata={"help": "The cosine at which a patch's subject gate opens, in (0, 1]."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PATCHER
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules, key=str)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        modules = self.target_modules
        if modules is not None and not (isinstance(modules, str) and modules) and not _names(modules):
            raise ValueError(f"target_modules must be None, a module name or a list of names, got {modules!r}")
        if self.key_module is not None and (not isinstance(self.key_module, str) or not self.key_module):
            raise ValueError(f"key_module must be None or a module name, got {self.key_module!r}")
        if not isinstance(self.num_patches, int) or isinstance(self.num_patches, bool) or self.num_patches < 0:
            raise ValueError(f"num_patches must be a non-negative integer, got {self.num_patches!r}")
        trainable = self.num_trainable_patches
        if not isinstance(trainable, int) or isinstance(trainable, bool) or not 0 <= trainable <= self.num_patches:
            raise ValueError(f"num_trainable_patches must be an integer in [0, num_patches], got {trainable!r}")
        if not isinstance(self.layer_index, int) or isinstance(self.layer_index, bool):
            raise ValueError(f"layer_index must be an integer, got {self.layer_index!r}")
        scale = self.init_value_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"init_value_scale must be a finite positive number, got {scale!r}")
        activation = self.patch_activation
        if activation is not None and (not isinstance(activation, str) or activation not in ACT2FN):
            raise ValueError(
                f"Unknown patch_activation {self.patch_activation!r}; use a transformers activation name such as "
                "'gelu', 'relu' or 'silu', or None for the FFN's own activation."
            )
        gate = self.gate_layer
        if gate is not None and (not isinstance(gate, int) or isinstance(gate, bool)):
            raise ValueError(f"gate_layer must be None or an integer, got {gate!r}")
        depth = self.gate_depth
        if depth is not None and (
            isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1
        ):
            raise ValueError(f"gate_depth must be None or a number in [0, 1], got {depth!r}")
        if self.gate_module is not None and (not isinstance(self.gate_module, str) or not self.gate_module):
            raise ValueError(f"gate_module must be None or a module name, got {self.gate_module!r}")
        threshold = self.gate_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"gate_threshold must be a number in (0, 1], got {threshold!r}")
        if self.patch_dtype is not None and self.patch_dtype not in PATCH_DTYPES:
            raise ValueError(f"patch_dtype must be one of {PATCH_DTYPES} or None, got {self.patch_dtype!r}")

    @classmethod
    def validate_weights_file(cls, path: str, config: Any) -> dict[str, Any]:
        return validate_adapter_file(path, config)


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) and name for name in value)


def _schema() -> dict[str, Any]:
    return config_schema(
        PatcherConfig,
        PATCHER,
        {
            "target_modules": STR_LIST,
            "key_module": NULLABLE_STR,
            "layer_index": {"type": "integer"},
            "patch_activation": NULLABLE_STR,
            "num_patches": {"type": "integer", "minimum": 0},
            "num_trainable_patches": {"type": "integer", "minimum": 0},
            "init_value_scale": {"type": "number", "exclusiveMinimum": 0},
            "patch_dtype": {"enum": [*PATCH_DTYPES, None]},
            "gate_layer": {"type": ["integer", "null"]},
            "gate_depth": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "gate_module": NULLABLE_STR,
            "gate_threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "fingerprint": fingerprint_schema(
                {"query_dim": {"type": "integer", "minimum": 1}, "output_dim": {"type": "integer", "minimum": 1}}
            ),
        },
    )


PatcherConfig.config_schema = _schema()
PatcherConfig.loaders = "transformer_patcher.PatcherModel.from_pretrained or transformer_patcher.Patcher"
