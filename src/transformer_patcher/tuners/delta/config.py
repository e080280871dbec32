"""``DeltaConfig``: which layers carry a low-rank weight delta, in what dtype, and which base model it belongs to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformer_patcher.tuners.config_file import NULLABLE_STR, AdapterConfig, config_schema, fingerprint_schema
from transformer_patcher.tuners.delta.delta_file import validate_delta_file
from transformer_patcher.tuners.peft_type import AdapterType

DELTA = AdapterType.DELTA
DELTA_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class DeltaConfig(AdapterConfig):
    """Configuration of a weight-delta adapter (peft type ``"DELTA"``): ``W' = W + up @ down`` on each target layer.

    The factors are computed elsewhere (PMET/MEMIT closed forms) and appended with ``DeltaLayer.add_delta``; nothing
    is trained. On injection the target names are put in model order and a fingerprint of their weights is written
    back, so that a saved ``adapter_config.json`` says exactly what it edits and what it may be loaded into.
    """

    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Exact full names of the nn.Linear / Conv1D layers that carry a delta (required)."},
    )
    method: str = field(default="pmet", metadata={"help": "Free label of the method that computed the deltas."})
    delta_dtype: str = field(
        default="float32", metadata={"help": f"dtype of the factors and of the delta computation: {DELTA_DTYPES}."}
    )
    rank: int = field(
        default=0,
        metadata={"help": "Total rank over all layers; kept in sync with the layers on every append and load."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DELTA
        targets = self.target_modules
        if isinstance(targets, (set, frozenset)):
            targets = sorted(targets)
        if isinstance(targets, tuple):
            targets = list(targets)
        if not isinstance(targets, list) or not targets or not all(isinstance(name, str) and name for name in targets):
            raise ValueError(
                "DeltaConfig needs target_modules: a non-empty list of the exact module names that carry a delta, "
                f"e.g. ['model.layers.4.mlp.down_proj']; got {self.target_modules!r}"
            )
        duplicates = sorted({name for name in targets if targets.count(name) > 1})
        if duplicates:
            raise ValueError(f"target_modules lists {duplicates} more than once")
        self.target_modules = targets
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string such as 'pmet' or 'memit', got {self.method!r}")
        if self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(f"delta_dtype must be one of {DELTA_DTYPES}, got {self.delta_dtype!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {self.rank!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, dict):
            raise ValueError(f"fingerprint must be a dict or None, got {type(self.fingerprint).__name__}")

    @classmethod
    def validate_weights_file(cls, path: str, config: Any) -> dict[str, Any]:
        return validate_delta_file(path, config)


def _schema() -> dict[str, Any]:
    dims = {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2}
    return config_schema(
        DeltaConfig,
        DELTA,
        {
            "target_modules": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "uniqueItems": True,
            },
            "method": {"type": "string", "minLength": 1},
            "delta_dtype": {"enum": list(DELTA_DTYPES)},
            "rank": {"type": "integer", "minimum": 0},
            "fingerprint": fingerprint_schema(
                {
                    "model_type": NULLABLE_STR,
                    "hidden_size": {"type": ["integer", "null"]},
                    "modules": {"type": "object", "additionalProperties": dims},
                }
            ),
        },
    )


DeltaConfig.config_schema = _schema()
DeltaConfig.loaders = "transformer_patcher.DeltaModel.from_pretrained"
