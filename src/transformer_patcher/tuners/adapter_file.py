"""Reading adapter files safely, shared by every adapter type: safetensors only, every tensor checked first.

An adapter file is untrusted input. It is parsed with safetensors (never pickle), grouped per adapted module, and
checked for missing or unexpected tensors, wrong ranks, dtypes and sizes, NaN/inf, and agreement with its config
(what each adapter type checks is in its own ``*_file`` module); a file larger than its config allows is refused
before it is read (``bounds``). Only a file that passes is ever loaded into a model, and only after its magnitudes
were compared with the model's own weights.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file

from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.tuners.tensor_schema import ID, ID_DTYPE, PEFT_KEY_PREFIX, TensorSpec, names

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Shapes = TypeVar("Shapes")  # what a tuner measures of one module's tensors (``PatchShapes``, ``DeltaShapes``)
Groups = dict[str, dict[str, torch.Tensor]]  # module name (without the peft prefix) → tensor name → tensor


def config_targets(config: Any) -> list[str]:
    """The config's ``target_modules`` as a list (a single name is a list of one)."""
    targets = config.target_modules
    return targets if isinstance(targets, list) else [targets]


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


def module_error(source: str, module: str, message: str) -> AdapterFileError:
    """The error for a problem with the tensors of one module in a checkpoint."""
    return AdapterFileError(f"{source}: module '{module}': {message}")


def group_tensors(
    state_dict: Mapping[str, torch.Tensor],
    specs: Iterable[TensorSpec],
    source: str,
    kind: tuple[str, str],
    check_dims: bool,
    measure: Callable[[str, Mapping[str, torch.Tensor], str], Shapes],
) -> tuple[Groups, dict[str, Shapes]]:
    """Split a checkpoint by module and check each in turn: exactly the ``specs`` tensors (an optional one may be
    missing), holding the values they declare (and their number of dimensions with ``check_dims``), then
    ``measure(module, group, source)``. ``kind`` names the adapter in errors: its peft type and what it holds
    ("PATCHER", "patch")."""
    specs = tuple(specs)
    groups = split_by_module(state_dict, names(specs), source, peft_type=kind[0], noun=kind[1])
    shapes = {}
    for module, group in groups.items():
        missing = [spec.name for spec in specs if spec.name not in group and not spec.optional]
        if missing:
            raise AdapterFileError(f"{source}: module '{module}' lacks tensors {missing}")
        for spec in specs:
            if spec.name not in group:
                continue
            problem = tensor_problem(spec, group[spec.name], check_dims)
            if problem:
                raise module_error(source, module, problem)
        shapes[module] = measure(module, group, source)
    return groups, shapes


def tensor_problem(spec: TensorSpec, tensor: torch.Tensor, check_dims: bool) -> str | None:
    """What is wrong with the values of ``tensor`` read as ``spec``, or None: edit ids must be 1-D int64, float tensors
    of a float dtype, of the spec's number of dimensions (only with ``check_dims``) and finite."""
    if spec.kind == ID:
        if tensor.dtype != getattr(torch, ID_DTYPE) or tensor.dim() != 1:
            return f"{spec.name} must be a 1-D int64 tensor of edit ids, got {tensor.dtype} {tuple(tensor.shape)}"
        return None
    if tensor.dtype not in FLOAT_DTYPES:
        return f"{spec.name} must be floating point (float32/float16/bfloat16/float64), got {tensor.dtype}"
    if check_dims and tensor.dim() != len(spec.shape):
        return f"{spec.name} must be {len(spec.shape)}-D, got shape {tuple(tensor.shape)}"
    if not torch.isfinite(tensor).all():
        return f"{spec.name} contains NaN or inf"
    return None


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


def read_checked_file(
    path: str | os.PathLike[str],
    group: Callable[[Mapping[str, torch.Tensor], str], tuple[Groups, dict[str, Shapes]]],
    dtype: tuple[str, str | None],
    targets: list[str],
    verb: str,
) -> dict[str, Shapes]:
    """Read an adapter file, ``group`` and check its tensors, and check them against the config: float dtype
    (``dtype``: the config field and its value) and target modules, which the file must ``verb``."""
    source = os.fspath(path)
    groups, shapes = group(read_adapter_file(path), source)
    check_dtypes(groups, dtype[1], source, dtype[0])
    check_same_modules(shapes, targets, source, verb=verb)
    return shapes


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
