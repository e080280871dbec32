"""A saved PATCHER patch set read with the standard library alone, for ``transformer-patcher info``.

The library's reader, ``describe_patch_set`` (``tuners/patcher/patch_set.py``), checks the folder with the adapter's
own loaders (peft's config class, safetensors into torch): seconds of imports to print a small table. This module
reads the same files without them (the edit log with the library's own torch-free reader, ``tuners.edit_log``) and
returns exactly what ``describe_patch_set(folder).to_dict()`` returns, but only for a folder it can show that reader
accepts: each of that reader's checks is made here too, as strictly or more so. The config must be as the package
writes it (its fields, each of the expected type, no other; an older one may lack a field that has a default), and
the weights file laid out as safetensors writes it, with every patch tensor of the expected name, dtype and shape and
every float finite. For anything else, unusual or wrong, :func:`describe_patch_folder` returns None and the caller
asks the library, so every error ``info`` shows is the library's own. ``tests/test_cli.py`` holds the constants here
to the library's and fuzzes the two readers against each other.
"""

from __future__ import annotations

import json
import math
import os
import sys
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformer_patcher.core.atomic import open_regular_file, recover_folder
from transformer_patcher.tuners.edit_log import read_edit_log
from transformer_patcher.tuners.patcher.schema import EDIT_IDS as ID_TENSORS
from transformer_patcher.tuners.patcher.schema import (
    FROZEN,
    PATCH_DTYPES,
    PATCH_TENSOR_NAMES,
    PATCH_TENSORS,
    SPECS,
    TRAINABLE,
    patch_sizes,
)
from transformer_patcher.tuners.tensor_schema import ID_DTYPE, PEFT_KEY_PREFIX, fixed_bytes, row_bytes

CONFIG_NAME = "adapter_config.json"  # peft.utils.CONFIG_NAME
WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
# transformers' ACT2FN names (a subset is enough: another name sends the folder to the library's reader)
ACTIVATIONS = frozenset(
    {
        *("gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh"),
        *("hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu", "relu", "relu2", "relu6"),
        *("sigmoid", "silu", "swish", "tanh"),
    }
)
# The header allowance of the file-size bound (tuners.bounds.file_size_limit allows at least 64 KiB besides the
# rows): a file whose tensors fit its config exactly, with a header this small, is always within that bound.
MAX_HEADER_BYTES = 64 * 1024 - 8
MAX_FILE_BYTES = 256 << 20  # a larger weights file is left to the library's reader, which maps it instead

# safetensors dtype → bytes per value; the float ones → the config's patch_dtype name
REQUIRED = {name for name in PATCH_TENSOR_NAMES if not SPECS[name].optional}  # an optional one a file may predate
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
DTYPE_NAMES = {**FLOAT_DTYPES, "I64": "int64"}
# Where the exponent of a little-endian float lies: (byte index, mask) pairs; a value is NaN or ±inf exactly when
# every one of its exponent bits is set, that is when (byte & mask) == mask for each pair.
_EXPONENT = {
    "F16": ((1, 0x7C),),
    "BF16": ((1, 0x7F), (0, 0x80)),
    "F32": ((3, 0x7F), (2, 0x80)),
    "F64": ((7, 0x7F), (6, 0xF0)),
}
_ALL_SET = {mask: bytes(int(b & mask == mask) for b in range(256)) for mask in (0x7C, 0x7F, 0x80, 0xF0)}


class _Unsure(Exception):
    """The folder is not one this module can vouch for: the library's reader decides."""


def describe_patch_folder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``describe_patch_set(folder).to_dict()``, read without torch; None when only the library's reader may say."""
    try:
        return _describe(Path(folder))
    except Exception:  # anything unexpected too: the library's reader will say what is wrong, in its own words
        return None


def _describe(folder: Path) -> dict[str, Any]:
    recover_folder(folder)
    config = _config(_read(folder / CONFIG_NAME))
    weights = folder / WEIGHTS_NAME
    _check(os.stat(weights).st_size <= min(_size_bound(config), MAX_FILE_BYTES), "larger than read here")
    data = _read(weights)
    counts = _edit_counts(_patch_tensors(data, config))
    targets = _targets(config)
    log = {entry["edit_id"]: entry for entry in read_edit_log(folder)}  # the library's own reader (no torch)
    return {
        "path": str(folder),
        "base_model": config["base_model_name_or_path"],
        "target_module": ", ".join(map(str, targets)),
        "activation": config["patch_activation"],
        "num_patches": sum(counts.values()),
        "file_bytes": os.stat(weights).st_size,
        "fingerprint": dict(config["fingerprint"] or {}),
        "edits": [
            {"edit_id": i, "neurons": n, **{k: v for k, v in log.get(i, {}).items() if k != "edit_id"}}
            for i, n in counts.items()
        ],
    }


def _check(condition: bool, why: str) -> None:
    if not condition:
        raise _Unsure(why)


def _read(path: Path) -> bytes:
    with open_regular_file(path) as handle:  # a FIFO would block a plain read
        return handle.read()


# ------------------------------------------------------------------------------------------------ config
def _integer(value: object, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text_or_none(value: object) -> bool:
    return value is None or isinstance(value, str)


def _name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, bool, int, float))


def _numbers(value: object) -> bool:
    return isinstance(value, list) and all(_number(v) for v in value)


def _fingerprint(value: object) -> bool:
    """A fingerprint giving the patched layer's widths, its other entries of the types the config schema gives."""
    if not isinstance(value, dict) or not all(_integer(value.get(dim), 1) for dim in ("query_dim", "output_dim")):
        return False
    typed: dict[str, Callable[[object], bool]] = {
        "weights_sha256": _text_or_none,
        "weights_sketch": lambda v: v is None or _numbers(v),
        "model_shapes_sha256": lambda v: isinstance(v, str),
        "model_sketch": _numbers,
    }
    return all(
        typed[key](item) if key in typed else _scalar(item) or (isinstance(item, list) and all(map(_scalar, item)))
        for key, item in value.items()
    )


# Every field of a PATCHER config as the package writes it, and what its value must be here.
CONFIG_FIELDS: dict[str, Callable[[object], bool]] = {
    "auto_mapping": lambda v: v is None or (isinstance(v, dict) and all(map(_text_or_none, v.values()))),
    "base_model_name_or_path": _text_or_none,
    "exclude_modules": lambda v: v is None,
    "fingerprint": _fingerprint,
    "gate_depth": lambda v: v is None or (_number(v) and 0 <= v <= 1),
    "gate_layer": lambda v: v is None or _integer(v),
    "gate_module": lambda v: v is None or _name(v),
    "gate_threshold": lambda v: _number(v) and 0 < v <= 1,
    "inference_mode": lambda v: isinstance(v, bool),
    "init_value_scale": lambda v: _number(v) and v > 0,
    "key_module": lambda v: v is None or _name(v),
    "layer_index": _integer,
    "modules_to_save": lambda v: v is None,
    "num_patches": lambda v: _integer(v, 0),
    "num_trainable_patches": lambda v: _integer(v, 0),
    "patch_activation": lambda v: v is None or (isinstance(v, str) and v in ACTIVATIONS),
    "patch_dtype": lambda v: v is None or (isinstance(v, str) and v in PATCH_DTYPES),
    "peft_type": lambda v: v == "PATCHER",
    "peft_version": _text_or_none,
    "revision": _text_or_none,
    "target_modules": lambda v: _name(v) or (isinstance(v, list) and bool(v) and all(map(_name, v))),
    "target_parameters": lambda v: v is None,
    "task_type": lambda v: v is None,
}
# The fields an older config may lack (written before they existed), with the defaults the library then applies.
CONFIG_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "exclude_modules": None,
    "gate_depth": None,
    "gate_layer": None,
    "gate_module": None,
    "gate_threshold": 0.8,
    "inference_mode": False,
    "init_value_scale": 10.0,
    "key_module": None,
    "layer_index": -1,
    "modules_to_save": None,
    "num_trainable_patches": 0,
    "patch_activation": None,
    "patch_dtype": "float32",
    "peft_version": None,
    "revision": None,
    "target_parameters": None,
    "task_type": None,
}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    _check(len({key for key, _ in pairs}) == len(pairs), "a repeated key")
    return dict(pairs)


def _refuse_constant(name: str) -> None:
    raise _Unsure(f"JSON {name}")


def _strict_json(data: bytes) -> Any:
    """JSON without repeated keys, NaN or ±Infinity (literal, or a number too large for a float)."""
    value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            _check(math.isfinite(item), "a non-finite number")
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return value


def _config(data: bytes) -> dict[str, Any]:
    config = _strict_json(data)
    _check(isinstance(config, dict) and set(config) <= set(CONFIG_FIELDS), "other fields than the package writes")
    _check(set(CONFIG_FIELDS) - set(CONFIG_DEFAULTS) <= set(config), "a field the reader needs is missing")
    config = CONFIG_DEFAULTS | config
    _check(all(valid(config[key]) for key, valid in CONFIG_FIELDS.items()), "a field of another type")
    _check(config["num_trainable_patches"] <= config["num_patches"], "more trainable patches than patches")
    _check(math.isfinite(config["init_value_scale"]), "a non-finite init_value_scale")
    return config


def _size_bound(config: dict[str, Any]) -> int:
    """The largest file whose tensors fit ``config`` exactly (the library's own bound is never smaller)."""
    width = DTYPE_BYTES[_safetensors_dtype(config["patch_dtype"])] if config["patch_dtype"] else 8
    sizes = patch_sizes(1, config["fingerprint"]["query_dim"], config["fingerprint"]["output_dim"])
    rows = config["num_patches"] * row_bytes(PATCH_TENSORS, sizes, width)
    return 8 + MAX_HEADER_BYTES + rows + len(_targets(config)) * fixed_bytes(PATCH_TENSORS, sizes, width)


def _targets(config: dict[str, Any]) -> list[str]:
    """The modules a config patches, as a list."""
    targets = config["target_modules"]
    return targets if isinstance(targets, list) else [targets]


def _safetensors_dtype(dtype: str) -> str:
    """safetensors' code for a torch dtype name ("float32" → "F32")."""
    return next(code for code, name in DTYPE_NAMES.items() if name == dtype)


# ----------------------------------------------------------------------------------------------- weights
def _safetensors(data: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The tensors of a safetensors file (name → dtype, shape, raw little-endian bytes), which must be laid out
    exactly as safetensors writes them: one header, then every tensor's bytes back to back, nothing after."""
    _check(len(data) >= 8, "no header")
    length = int.from_bytes(data[:8], "little")
    _check(2 <= length <= MAX_HEADER_BYTES and 8 + length <= len(data), "a header of another length")
    _check(data[8:9] == b"{", "a header that is not a JSON object")
    header = _strict_json(data[8 : 8 + length])
    _check(isinstance(header, dict), "a header that is not a JSON object")
    # Python's json reads a lone surrogate (an escaped "\\ud800"), safetensors refuses it: encoding raises here
    json.dumps(header, ensure_ascii=False).encode("utf-8")
    metadata = header.pop("__metadata__", {})
    _check(isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()), "odd metadata")
    buffer = data[8 + length :]
    tensors, spans = {}, []
    for name, info in header.items():
        _check(isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}, "an odd tensor entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        _check(isinstance(dtype, str) and dtype in DTYPE_BYTES, "another dtype")
        _check(isinstance(shape, list) and all(_integer(d, 0) for d in shape), "an odd shape")
        _check(isinstance(offsets, list) and len(offsets) == 2 and all(_integer(o, 0) for o in offsets), "odd offsets")
        start, end = offsets
        _check(end - start == math.prod(shape) * DTYPE_BYTES[dtype], "offsets that do not match the shape")
        spans.append((start, end))
        tensors[name] = (dtype, tuple(shape), buffer[start:end])
    position = 0
    for start, end in sorted(spans):
        _check(start == position, "a gap or an overlap between tensors")
        position = end
    _check(position == len(buffer), "bytes after the last tensor")
    return tensors


def _finite(dtype: str, raw: bytes) -> bool:
    """Whether every float in ``raw`` is finite: no value has all its exponent bits set (see ``_EXPONENT``)."""
    size = DTYPE_BYTES[dtype]
    hits = -1
    for index, mask in _EXPONENT[dtype]:
        hits &= int.from_bytes(raw[index::size].translate(_ALL_SET[mask]), "little")
    return hits == 0


def _patch_tensors(data: bytes, config: dict[str, Any]) -> list[bytes]:
    """Check the weights file as ``validate_adapter_file`` does (or more strictly); return its edit-id tensors."""
    groups: dict[str, dict[str, tuple[str, tuple[int, ...], bytes]]] = {}
    for key, tensor in _safetensors(data).items():
        _check(key.startswith(PEFT_KEY_PREFIX), "a tensor name without peft's prefix")
        module, _, attr = key[len(PEFT_KEY_PREFIX) :].rpartition(".")
        _check(bool(module) and attr in PATCH_TENSOR_NAMES, "a tensor that is not a patch tensor")
        groups.setdefault(module, {})[attr] = tensor
    targets = _targets(config)
    _check(bool(groups) and set(groups) == set(targets), "tensors for other modules than the config's")
    dims = config["fingerprint"]["query_dim"], config["fingerprint"]["output_dim"]
    total, ids = 0, []
    for group in groups.values():
        _check(set(group) >= REQUIRED, "a missing patch tensor")
        n_frozen, n_trainable = (_rows(group[names[0]][1]) for names in (FROZEN, TRAINABLE))
        sizes = {True: patch_sizes(n_frozen, *dims), False: patch_sizes(n_trainable, *dims)}
        for name, (dtype, shape, raw) in group.items():
            _check(shape == SPECS[name].shape_for(sizes[SPECS[name].frozen]), "a tensor of another shape")
            if name in ID_TENSORS:
                _check(dtype == _safetensors_dtype(ID_DTYPE), "edit ids that are not int64")
                ids.append(raw)
            else:
                _check(dtype in FLOAT_DTYPES, "patch values that are not floats")
                _check(config["patch_dtype"] in (None, FLOAT_DTYPES[dtype]), "another dtype than the config's")
                _check(_finite(dtype, raw), "NaN or inf")
        total += n_frozen + n_trainable
    _check(total == config["num_patches"], "another number of patches than the config's")
    return ids


def _rows(shape: tuple[int, ...]) -> int:
    """The first size of a shape (-1 for a scalar: no expected shape then matches)."""
    return shape[0] if shape else -1


def _edit_counts(id_tensors: list[bytes]) -> dict[int, int]:
    """Neurons per edit id, by id."""
    counts: dict[int, int] = {}
    for raw in id_tensors:
        ids = array("q", raw)
        if sys.byteorder == "big":
            ids.byteswap()
        for edit_id in ids:
            counts[edit_id] = counts.get(edit_id, 0) + 1
    return dict(sorted(counts.items()))
