"""Reading ``adapter_config.json`` safely, shared by every adapter type of the package.

A saved config is untrusted input: it is parsed as JSON, checked against a JSON schema that names every field of the
config class (unknown fields refused), searched for non-finite numbers, and only then turned into a config. Loading a
config also checks the ``adapter_model.safetensors`` next to it, so that a PEFT load fails before the model is touched;
what that check found travels with the config as its ``loaded`` record, for the tuner to compare with the model.
A refused config names the package's loader: plain peft reads ``peft_type`` itself before any of this runs, so it
gives its own ``KeyError``/``TypeError`` for a config that is not an object, and loads one whose ``peft_type`` was
changed as that other adapter type.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import jsonschema
from peft import PeftConfig
from peft.utils import CONFIG_NAME

from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.tuners.adapter_file import locate_adapter_weights

NULLABLE_STR: dict[str, Any] = {"type": ["string", "null"]}
STR_LIST: dict[str, Any] = {"type": ["array", "string", "null"], "items": {"type": "string"}}

# Fields peft itself reads on every config; the adapters only carry them along.
PEFT_FIELDS: dict[str, dict[str, Any]] = {
    "exclude_modules": STR_LIST,
    "target_parameters": STR_LIST,
    "modules_to_save": STR_LIST,
    "inference_mode": {"type": "boolean"},
    "base_model_name_or_path": NULLABLE_STR,
    "revision": NULLABLE_STR,
    "task_type": NULLABLE_STR,
    "peft_version": NULLABLE_STR,
    "auto_mapping": {"type": ["object", "null"]},
}
PEFT_UNUSED = ("exclude_modules", "target_parameters", "modules_to_save")
# The weight views of a fingerprint (``fingerprint`` module); the whole-model ones are absent from older files.
FINGERPRINT_VIEWS: dict[str, dict[str, Any]] = {
    "weights_sha256": NULLABLE_STR,
    "weights_sketch": {"type": ["array", "null"], "items": {"type": "number"}},
    "model_shapes_sha256": {"type": "string"},
    "model_sketch": {"type": "array", "items": {"type": "number"}},
}


@dataclass
class CarriedFields:
    """Fields every adapter config of the package declares: the base-model fingerprint it records, and three that
    peft reads on any config."""

    fingerprint: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Filled in on injection: base model facts checked when the adapter is loaded again."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Unused; read by peft."})
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unused; read by peft."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})


def fingerprint_schema(properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Schema of a config's ``fingerprint``: ``properties`` (the adapter type's facts), the weight views, or null."""
    return {"type": ["object", "null"], "properties": {**properties, **FINGERPRINT_VIEWS}}


def config_schema(config_cls: type, peft_type: str, properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Schema of ``config_cls``'s JSON form: ``properties`` typed, its other dataclass fields free, nothing else."""
    typed = {"peft_type": {"const": str(peft_type)}, **PEFT_FIELDS, **properties}
    return {
        "type": "object",
        "properties": {f.name: typed.get(f.name, {}) for f in fields(config_cls)},
        "required": ["peft_type"],
        "additionalProperties": False,
    }


def _non_finite(value: object, path: str) -> list[str]:
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}.{i}")]
    return []


MAX_DEPTH = 32


def _depth(value: object) -> int:
    """Nesting depth of JSON data, counted without recursion (deep input must not overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_config_dict(
    data: object, schema: dict[str, Any], peft_type: str, source: str = CONFIG_NAME, hint: str = ""
) -> None:
    """Raise ``AdapterFileError`` when ``data`` is nested too deeply, breaks ``schema`` or holds NaN/inf anywhere;
    ``hint`` ends the message."""
    if _depth(data) > MAX_DEPTH:
        raise AdapterFileError(f"{source}: JSON nested more than {MAX_DEPTH} levels deep; not an adapter config.{hint}")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        details = "; ".join(f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5])
        raise AdapterFileError(f"{source} is not a valid {peft_type} adapter config: {details}.{hint}")
    bad_numbers = _non_finite(data, "")
    if bad_numbers:
        raise AdapterFileError(f"{source}: non-finite value in {', '.join(bad_numbers)}.{hint}")


@dataclass(frozen=True)
class LoadedWeights:
    """How a config was read from an adapter folder: its weights file, what checking it against the config found
    (module name → shapes), and whether the loader asked for the base-model fingerprint to be checked."""

    path: str
    shapes: Mapping[str, Any]
    check_fingerprint: bool = True


class ValidatedConfigFile:
    """Mixin for a ``PeftConfig`` dataclass: schema-checked ``from_json_file``, weight-checked ``from_pretrained``.

    Subclasses set ``config_schema`` and ``loaders`` and implement ``validate_weights_file``; list this class before
    ``PeftConfig``. A config read by ``from_pretrained`` carries a ``LoadedWeights`` record, set once as it is built
    (never a dataclass field, so never saved); one built any other way has None.
    """

    config_schema: ClassVar[dict[str, Any]]
    loaders: ClassVar[str]  # the supported way to load this adapter type, named by every refusal of its config
    loaded: LoadedWeights | None = None  # not a field: this mixin is no dataclass

    @classmethod
    def _hint(cls) -> str:
        peft_type = cls.config_schema["properties"]["peft_type"]["const"]
        return (
            f" A {peft_type} adapter loads with {cls.loaders}, which check the whole folder before the model changes; "
            "plain PeftModel.from_pretrained acts on the config's peft_type before anything is checked."
        )

    @classmethod
    def validate_config_dict(cls, data: object, source: str = CONFIG_NAME) -> None:
        peft_type = cls.config_schema["properties"]["peft_type"]["const"]
        check_config_dict(data, cls.config_schema, peft_type, source, cls._hint())

    @classmethod
    def validate_weights_file(cls, path: str, config: Any) -> dict[str, Any]:
        """Check a saved ``adapter_model.safetensors`` against its config; raise ``AdapterFileError`` if it fails.

        Returns the per-module shapes found, by module name.
        """
        raise NotImplementedError

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """Read ``adapter_config.json`` and validate it against the schema before anything is built from it."""
        try:
            with open(path_json_file, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise AdapterFileError(
                f"{path_json_file} is not a readable JSON adapter config: {exc}.{cls._hint()}"
            ) from exc
        cls.validate_config_dict(loaded, source=path_json_file)
        return loaded

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        check_fingerprint: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Load and validate a config, then check its ``adapter_model.safetensors`` before any model is touched.

        ``check_fingerprint=False`` is recorded for the tuner: the adapter may then attach to a model its fingerprint
        does not name (with a warning).
        """
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)  # type: ignore[misc]
        except AdapterFileError:
            raise
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(
                f"{pretrained_model_name_or_path}: not a usable adapter config: {exc}.{cls._hint()}"
            ) from exc
        unused = {name: getattr(config, name) for name in PEFT_UNUSED if getattr(config, name)}
        if unused:  # peft would act on them, and fail only after changing the model
            raise AdapterFileError(
                f"{pretrained_model_name_or_path}: {CONFIG_NAME} sets {unused}, which a {config.peft_type} adapter "
                "never uses: its file holds only its own tensors, for exactly its target_modules"
            )
        weights = locate_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.loaded = LoadedWeights(weights, cls.validate_weights_file(weights, config), check_fingerprint)
        return config


class AdapterConfig(ValidatedConfigFile, CarriedFields, PeftConfig):
    """Base of the package's adapter configs: a ``PeftConfig`` with the carried fields, checked whenever it is read.

    Not a dataclass itself; each adapter type's config is one, and adds its own fields.
    """
