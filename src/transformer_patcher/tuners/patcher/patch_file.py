"""Reading patch files safely: safetensors only, every tensor checked before the model is touched.

An adapter file is untrusted input. It is parsed with safetensors (never pickle), grouped per patched module, and
checked for missing or unexpected tensors, wrong ranks, dtypes and sizes, NaN/inf, and agreement with its config;
a file larger than its config allows is refused before it is read (``bounds``). Only a file that passes is ever
loaded into a model, and only after its magnitudes were compared with the model's own weights.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file

from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.tuners.bounds import MAX_WIDTH, check_declared_size, file_size_limit, largest_row_norm

PEFT_KEY_PREFIX = "base_model.model."
FROZEN = ("patch_frozen_keys", "patch_frozen_bias", "patch_frozen_values", "patch_frozen_edit_ids")
TRAINABLE = ("patch_keys", "patch_bias", "patch_values", "patch_value_scale", "patch_edit_ids")
PATCH_TENSOR_NAMES = FROZEN + TRAINABLE
_ID_TENSORS = ("patch_frozen_edit_ids", "patch_edit_ids")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class PatchShapes:
    """Patch counts, dimensions and largest magnitudes of one patched module in a checkpoint."""

    n_frozen: int
    n_trainable: int
    query_dim: int
    output_dim: int
    key_norm: float
    bias_norm: float
    value_norm: float  # of the effective values (v' ⊙ a for the trainable patches)

    @property
    def dims(self) -> tuple[int, int]:
        return self.query_dim, self.output_dim

    @property
    def magnitudes(self) -> dict[str, float]:
        """Largest key and value row norms and largest |bias|, by what ``bounds.check_magnitudes`` calls them."""
        return {"patch keys": self.key_norm, "patch biases": self.bias_norm, "patch values": self.value_norm}

    @property
    def total(self) -> int:
        return self.n_frozen + self.n_trainable


def _check_group(module: str, group: Mapping[str, torch.Tensor], source: str) -> PatchShapes:
    missing = [name for name in PATCH_TENSOR_NAMES if name not in group]
    if missing:
        raise AdapterFileError(f"{source}: module '{module}' lacks tensors {missing}")

    def fail(message: str) -> AdapterFileError:
        return AdapterFileError(f"{source}: module '{module}': {message}")

    for name, tensor in group.items():
        if name in _ID_TENSORS:
            if tensor.dtype != torch.int64 or tensor.dim() != 1:
                raise fail(f"{name} must be a 1-D int64 tensor of edit ids, got {tensor.dtype} {tuple(tensor.shape)}")
        elif tensor.dtype not in FLOAT_DTYPES:
            raise fail(f"{name} must be floating point (float32/float16/bfloat16/float64), got {tensor.dtype}")
        elif not torch.isfinite(tensor).all():
            raise fail(f"{name} contains NaN or inf")
    fk, fv, tk, tv = (group[n] for n in ("patch_frozen_keys", "patch_frozen_values", "patch_keys", "patch_values"))
    if fk.dim() != 2 or tk.dim() != 2 or fv.dim() != 2 or tv.dim() != 2:
        raise fail("patch keys and values must be 2-D (patches × dim)")
    n_frozen, n_trainable = fk.shape[0], tk.shape[0]
    query_dim, output_dim = fk.shape[1], fv.shape[1]
    expected = {
        "patch_frozen_keys": (n_frozen, query_dim),
        "patch_frozen_bias": (n_frozen,),
        "patch_frozen_values": (n_frozen, output_dim),
        "patch_frozen_edit_ids": (n_frozen,),
        "patch_keys": (n_trainable, query_dim),
        "patch_bias": (n_trainable,),
        "patch_values": (n_trainable, output_dim),
        "patch_value_scale": (n_trainable, output_dim),
        "patch_edit_ids": (n_trainable,),
    }
    for name, shape in expected.items():
        if tuple(group[name].shape) != shape:
            raise fail(f"{name} has shape {tuple(group[name].shape)}, expected {shape}")
    biases = torch.cat([group["patch_frozen_bias"].double(), group["patch_bias"].double()]).abs()
    return PatchShapes(
        n_frozen,
        n_trainable,
        query_dim,
        output_dim,
        key_norm=largest_row_norm(fk, tk),
        bias_norm=float(biases.max()) if biases.numel() else 0.0,
        value_norm=largest_row_norm(fv, tv.double() * group["patch_value_scale"].double()),
    )


def split_by_module(
    state_dict: Mapping[str, torch.Tensor], tensor_names: tuple[str, ...], source: str, peft_type: str, noun: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Group checkpoint tensors by module (names without the peft prefix); refuse any tensor not in ``tensor_names``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, _, attr = key.removeprefix(PEFT_KEY_PREFIX).rpartition(".")
        if attr not in tensor_names or not module:
            raise AdapterFileError(f"{source}: unexpected tensor '{key}' (not part of a {peft_type} adapter)")
        groups.setdefault(module, {})[attr] = tensor
    if not groups:
        raise AdapterFileError(f"{source}: holds no {noun} tensors")
    return groups


def check_same_modules(found: Collection[str], targets: list[str], source: str, verb: str) -> None:
    """Refuse a file whose tensors are for other modules than its config targets."""
    if set(found) != set(targets):
        raise AdapterFileError(
            f"{source} {verb} modules {sorted(found)} but its config targets {targets}: config and weights do not "
            "belong together"
        )


def layers_holding(model: Any, layer_cls: type, adapter_name: str, store: str) -> dict[str, Any]:
    """The model's ``layer_cls`` modules whose ``store`` dict holds ``adapter_name``, by name without peft's prefix."""
    return {
        name.removeprefix(PEFT_KEY_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, layer_cls) and adapter_name in getattr(module, store)
    }


def check_checkpoint_covers(found: Collection[str], wrapped: Collection[str], noun: str, verb: str) -> None:
    """Refuse a checkpoint with ``noun`` for modules the model's adapter does not ``verb``, or lacking some it does."""
    unknown = sorted(set(found) - set(wrapped))
    if unknown:
        raise AdapterFileError(f"the checkpoint has {noun} for modules this adapter does not {verb}: {unknown}")
    missing = sorted(set(wrapped) - set(found))
    if missing:
        raise AdapterFileError(f"the checkpoint has no {noun} for {missing}")


def group_patch_tensors(
    state_dict: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, PatchShapes]]:
    """Split checkpoint tensors by patched module (names without the peft prefix) and validate each group."""
    groups = split_by_module(state_dict, PATCH_TENSOR_NAMES, source, peft_type="PATCHER", noun="patch")
    return groups, {module: _check_group(module, group, source) for module, group in groups.items()}


def read_adapter_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Parse a safetensors file, turning every parse failure into an ``AdapterFileError``."""
    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupted"
        ) from exc


def check_dtypes(groups: Mapping[str, Mapping[str, torch.Tensor]], dtype: str | None, source: str, field: str) -> None:
    """Refuse float tensors whose dtype is not the config's ``field`` (``dtype``; None: any float dtype)."""
    for module, group in groups.items():
        for name, tensor in group.items():
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != getattr(torch, dtype):
                raise AdapterFileError(
                    f"{source}: module '{module}': {name} is {tensor.dtype}, but the config's {field} is {dtype}"
                )


def check_dims_fit(
    shapes: Mapping[str, Any], model_dims: Mapping[str, tuple[int, int]], source: str, noun: str
) -> None:
    """Refuse a checkpoint whose (input, output) size for a module is not that module's in the model."""
    for module, shape in shapes.items():
        have = model_dims.get(module)
        if tuple(shape.dims) != have:
            size = "absent" if have is None else f"{have[0]}→{have[1]}"
            raise AdapterFileError(
                f"{source}: the {noun} for '{module}' are {shape.dims[0]}→{shape.dims[1]}, but that layer is {size} "
                "in this model"
            )


def _check_patch_file_size(path: str, config: Any) -> None:
    """Bound the file by ``num_patches`` rows of the fingerprint's widths (``MAX_WIDTH`` when it gives none): per
    patch a key, a bias, a value and a value scale in ``patch_dtype`` (8 bytes when unset) and an int64 edit id."""
    fingerprint = config.fingerprint or {}
    query_dim, output_dim = (fingerprint.get(dim) or MAX_WIDTH for dim in ("query_dim", "output_dim"))
    itemsize = getattr(torch, config.patch_dtype).itemsize if config.patch_dtype else 8
    targets = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
    row_bytes = (query_dim + 1 + 2 * output_dim) * itemsize + 8
    limit = file_size_limit(config.num_patches, row_bytes, len(PATCH_TENSOR_NAMES) * len(targets))
    implied = f"num_patches={config.num_patches} of {query_dim}→{output_dim}, patch_dtype={config.patch_dtype}"
    check_declared_size(path, limit, implied)


def validate_adapter_file(path: str | os.PathLike[str], config: Any) -> dict[str, PatchShapes]:
    """Check a saved adapter file against its own config; raise ``AdapterFileError`` on any disagreement."""
    source = os.fspath(path)
    _check_patch_file_size(source, config)
    groups, shapes = group_patch_tensors(read_adapter_file(path), source)
    check_dtypes(groups, config.patch_dtype, source, "patch_dtype")
    targets = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
    check_same_modules(shapes, targets, source, verb="patches")
    total = sum(s.total for s in shapes.values())
    if total != config.num_patches:
        raise AdapterFileError(f"{source} holds {total} patches but its config says num_patches={config.num_patches}")
    fingerprint = config.fingerprint or {}
    for module, shape in shapes.items():
        for dim in ("query_dim", "output_dim"):
            if dim in fingerprint and getattr(shape, dim) != fingerprint[dim]:
                raise AdapterFileError(
                    f"{source}: module '{module}' has {dim}={getattr(shape, dim)}, but the config's fingerprint says "
                    f"{fingerprint[dim]}"
                )
    return shapes


def locate_adapter_weights(model_id: str | os.PathLike[str], subfolder: str | None = None, **kwargs: Any) -> str:
    """Path of the adapter's safetensors file (downloaded if remote).

    A directory without that file is refused (peft would fail only after changing the model), and so is one that
    only has a pickled ``adapter_model.bin``: unpickling can run arbitrary code.
    """
    directory = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(directory):
        weights = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(weights):
            return weights
        if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            raise AdapterFileError(
                f"{directory} holds only a pickled {WEIGHTS_NAME}; transformer-patcher reads adapters from "
                f"{SAFETENSORS_WEIGHTS_NAME} only, because unpickling can run arbitrary code."
            )
        raise AdapterFileError(f"{directory} has no {SAFETENSORS_WEIGHTS_NAME} file: it is not a complete adapter")
    download_args = set(inspect.signature(hf_hub_download).parameters)
    hub_kwargs = {k: v for k, v in kwargs.items() if k in download_args}
    try:
        return hf_hub_download(os.fspath(model_id), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except EntryNotFoundError as exc:
        raise AdapterFileError(
            f"'{model_id}' has no {SAFETENSORS_WEIGHTS_NAME}; only safetensors adapters are accepted."
        ) from exc
