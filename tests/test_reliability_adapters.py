"""Regressions for adapter loading (issue 17, items 3, 4, 5 and 8): unverified adapters, fingerprints that must not be
rewritten or fooled, finite but absurd tensors, files larger than their config allows, and config refusals that name
the package's loaders. Each refusal leaves the model exactly as it was."""

from __future__ import annotations

import json
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from tiny_models import build, inputs_for, logits
from transformer_patcher import (
    AdapterFileError,
    DeltaConfig,
    DeltaLayer,
    DeltaModel,
    FingerprintMismatchError,
    PatcherConfig,
    PatcherLayer,
    PatcherModel,
    get_delta_model,
    get_patcher_model,
)
from transformer_patcher.core.errors import UnverifiedAdapterError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
LLAMA_DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
FFN = "model.layers.1.mlp"  # the last FFN: where a patch set goes, and one of the delta's layers


def save_patches(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(0)
    model = get_patcher_model(build("llama", seed=seed), PatcherConfig())
    layer = model.patch_layer()
    layer.add_patches(torch.randn(3, 32), torch.zeros(3), torch.randn(3, 32), edit_id=[1, 2, 3])
    layer.commit()
    layer.add_patches(torch.randn(1, 32), torch.zeros(1), torch.randn(1, 32), edit_id=4)
    model.save_pretrained(folder)
    return folder


def save_delta(folder: Path, seed: int = 0) -> Path:
    model = get_delta_model(build("llama", seed=seed), DeltaConfig(target_modules=LLAMA_DOWN))
    g = torch.Generator().manual_seed(0)
    for rank, layer in zip((2, 3), model.base_model.delta_layers().values(), strict=True):
        layer.add_delta("default", torch.randn(32, rank, generator=g) * 0.2, torch.randn(rank, 64, generator=g) * 0.2)
    model.save_pretrained(folder)
    return folder


KINDS: dict[str, tuple[Callable[[Path], Path], Callable[..., PeftModel]]] = {
    "PATCHER": (save_patches, PatcherModel.from_pretrained),
    "DELTA": (save_delta, DeltaModel.from_pretrained),
}


def edit_config(folder: Path, edit: Callable[[dict], object]) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config))


def untouched(model: torch.nn.Module, reference: torch.Tensor) -> bool:
    return (
        not any(isinstance(m, (PatcherLayer, DeltaLayer)) for m in model.modules())
        and not hasattr(model, "peft_config")
        and torch.equal(logits(model, inputs_for(model)), reference)
    )


def refused_everywhere(model: torch.nn.Module, folder: Path, kind: str, error: type[Exception], match: str) -> None:
    """The package's loader and plain peft both refuse, with the same clear error, and change nothing."""
    reference = logits(model, inputs_for(model))
    for loader in (KINDS[kind][1], PeftModel.from_pretrained):
        with pytest.raises(error, match=match):
            loader(model, folder)
        assert untouched(model, reference)


def sharing_the_adapted_layers(seed: int = 1) -> torch.nn.Module:
    """Another checkpoint with seed 0's FFNs copied in: every weight a patch set or this delta reads is the same."""
    model, original = build("llama", seed=seed), build("llama")
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp"
        model.get_submodule(name).load_state_dict(original.get_submodule(name).state_dict())
    return model


def with_noise(relative: float) -> torch.nn.Module:
    model = build("llama")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + relative * torch.randn(parameter.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------- 3a: missing fingerprint
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_without_fingerprint_is_refused_and_names_the_opt_out(kind: str, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    edit_config(folder, lambda c: c.update(fingerprint=None))
    refused_everywhere(build("llama", seed=1), folder, kind, UnverifiedAdapterError, "check_fingerprint=False")


def test_transformers_load_adapter_refuses_an_adapter_without_fingerprint(tmp_path: Path) -> None:
    folder = save_patches(tmp_path / "adapter")
    edit_config(folder, lambda c: c.update(fingerprint=None))
    model = build("llama", seed=1)
    reference = logits(model, inputs_for(model))
    with pytest.raises(UnverifiedAdapterError, match="records no fingerprint"):
        model.load_adapter(str(folder))
    assert not any(isinstance(m, PatcherLayer) for m in model.modules())
    assert torch.equal(logits(model, inputs_for(model)), reference)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_without_fingerprint_loads_with_a_warning_when_asked(kind: str, tmp_path: Path) -> None:
    save, load = KINDS[kind]
    folder = save(tmp_path / "adapter")
    edit_config(folder, lambda c: c.update(fingerprint=None))
    with pytest.warns(UserWarning, match="check_fingerprint=False: .* records no fingerprint"):
        loaded = load(build("llama", seed=1), folder, check_fingerprint=False)
    assert loaded.peft_config["default"].fingerprint is None
    assert get_state(loaded) == get_state(load(build("llama"), save(tmp_path / "reference")))


def get_state(model: PeftModel) -> list[tuple[str, list]]:
    return [(k, v.tolist()) for k, v in sorted(get_peft_model_state_dict(model).items())]


# -------------------------------------------------------------------- 3b: the recorded fingerprint is kept
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unchecked_load_and_save_keeps_the_fingerprint_of_the_model_it_was_made_on(kind: str, tmp_path: Path) -> None:
    save, load = KINDS[kind]
    folder = save(tmp_path / "adapter")
    recorded = json.loads((folder / CONFIG).read_text())["fingerprint"]
    with pytest.warns(UserWarning, match="may not belong to this model"):
        loaded = load(build("llama", seed=1), folder, check_fingerprint=False)
    loaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / CONFIG).read_text())["fingerprint"] == recorded
    refused_everywhere(build("llama", seed=1), tmp_path / "resaved", kind, FingerprintMismatchError, "differ")
    KINDS[kind][1](build("llama"), tmp_path / "resaved")  # still loads into the model it was made on


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_checked_load_at_another_precision_keeps_the_recorded_fingerprint(kind: str, tmp_path: Path) -> None:
    save, load = KINDS[kind]
    folder = save(tmp_path / "adapter")
    recorded = json.loads((folder / CONFIG).read_text())["fingerprint"]
    load(build("llama").to(torch.bfloat16), folder).save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / CONFIG).read_text())["fingerprint"] == recorded


# ------------------------------------------------------------------------- 3c: the whole model is covered
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_model_sharing_the_adapted_layers_is_refused(kind: str, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    refused_everywhere(
        sharing_the_adapted_layers(), folder, kind, FingerprintMismatchError, "weights of the base model"
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_percent_noise_on_every_weight_is_refused(kind: str, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    refused_everywhere(with_noise(0.01), folder, kind, FingerprintMismatchError, "weights of the base model differ")


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_model_at_another_precision_loads_without_warning(kind: str, dtype: torch.dtype, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        KINDS[kind][1](build("llama").to(dtype), folder)
        PeftModel.from_pretrained(build("llama").to(dtype), folder)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fingerprint_without_whole_model_views_is_checked_on_what_it_records(kind: str, tmp_path: Path) -> None:
    """Files written before the whole-model views: the adapted layers and the architecture are still checked; the
    rest of the model cannot be, and the load says so."""
    folder = KINDS[kind][0](tmp_path / "adapter")
    edit_config(folder, lambda c: [c["fingerprint"].pop(v) for v in ("model_shapes_sha256", "model_sketch")])
    with pytest.warns(UserWarning, match="predates whole-model fingerprints"):
        KINDS[kind][1](build("llama"), folder)
    refused_everywhere(
        build("llama", seed=1), folder, kind, FingerprintMismatchError, "weights of the (patched|edited)"
    )
    with pytest.warns(UserWarning, match="predates"):
        KINDS[kind][1](sharing_the_adapted_layers(), folder)  # the limitation of an old fingerprint


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_altered_whole_model_sketch_is_refused(kind: str, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    edit_config(
        folder, lambda c: c["fingerprint"].update(model_sketch=[x * 1.01 for x in c["fingerprint"]["model_sketch"]])
    )
    refused_everywhere(build("llama"), folder, kind, FingerprintMismatchError, "weights of the base model differ")
    edit_config(folder, lambda c: c["fingerprint"].update(model_shapes_sha256="0" * 64))
    refused_everywhere(build("llama"), folder, kind, FingerprintMismatchError, "parameter shapes differ")


# ------------------------------------------------------------------------------ 4: finite but absurd values
def _scale_tensor(folder: Path, suffix: str, value: float) -> None:
    tensors = load_file(folder / WEIGHTS)
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key] = tensors[key].clone()
    tensors[key].reshape(-1)[0] = value
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("kind", "suffix", "what"),
    [
        ("PATCHER", ".patch_frozen_keys", "patch keys"),
        ("PATCHER", ".patch_keys", "patch keys"),
        ("PATCHER", ".patch_frozen_bias", "patch biases"),
        ("PATCHER", ".patch_frozen_values", "patch values"),
        ("PATCHER", ".patch_value_scale", "patch values"),
        ("DELTA", "layers.1.mlp.down_proj.delta_up", "weight delta"),
        ("DELTA", "layers.0.mlp.down_proj.delta_down", "weight delta"),
    ],
)
@pytest.mark.parametrize("value", [3e38, 1e30, -1e8])
def test_finite_but_absurd_tensors_are_refused(kind: str, suffix: str, what: str, value: float, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    _scale_tensor(folder, suffix, value)
    refused_everywhere(build("llama"), folder, kind, AdapterFileError, f"{what} for .* finite but absurd")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_absurd_tensors_are_refused_when_loaded_into_an_existing_adapter(kind: str, tmp_path: Path) -> None:
    """``load_adapter`` into an adapter that exists skips the injection checks; the state-dict hook still bounds."""
    save, load = KINDS[kind]
    folder = save(tmp_path / "adapter")
    _scale_tensor(folder, "_keys" if kind == "PATCHER" else "delta_up", 1e30)
    target = load(build("llama"), save(tmp_path / "own"))
    before = get_state(target)
    with pytest.raises(AdapterFileError, match="finite but absurd"):
        target.load_adapter(folder, adapter_name="default")
    assert get_state(target) == before


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_large_but_plausible_tensors_still_load(kind: str, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    _scale_tensor(folder, ".patch_frozen_values" if kind == "PATCHER" else "delta_up", 500.0)
    KINDS[kind][1](build("llama"), folder)


# --------------------------------------------------------------------------------- 5: declared file sizes
def _declare_huge(folder: Path, suffix: str, shape: list[int]) -> int:
    """Rewrite the weights as a consistent safetensors file whose tensor ``suffix`` has ``shape`` (its data zeros, a
    sparse tail), as a forger would: header, offsets and file size agree. Returns the file size."""
    data = (folder / WEIGHTS).read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header, buffer = json.loads(data[8 : 8 + length]), data[8 + length :]
    name = next(k for k in header if k.endswith(suffix))
    entries = sorted((k for k in header if k not in ("__metadata__", name)), key=lambda k: header[k]["data_offsets"])
    kept, offset = b"", 0
    for key in entries:
        start, end = header[key]["data_offsets"]
        kept += buffer[start:end]
        header[key]["data_offsets"] = [offset, offset + end - start]
        offset += end - start
    size = 4 * shape[0] * shape[1]
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / WEIGHTS, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + kept)
        handle.truncate(8 + len(text) + offset + size)
    return 8 + len(text) + offset + size


@pytest.mark.parametrize(
    ("kind", "suffix", "shape"),
    [
        ("PATCHER", ".patch_frozen_keys", [3, 2**27]),  # 1.6 GB
        ("PATCHER", ".patch_frozen_values", [2**27, 3]),
        ("DELTA", "layers.0.mlp.down_proj.delta_down", [2, 2**27]),
        ("DELTA", "layers.1.mlp.down_proj.delta_up", [2**27, 3]),
    ],
)
def test_file_declaring_more_than_its_config_allows_is_refused_before_reading(
    kind: str, suffix: str, shape: list[int], tmp_path: Path
) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    assert _declare_huge(folder, suffix, shape) > 10**9
    start = time.perf_counter()
    refused_everywhere(
        build("llama"), folder, kind, AdapterFileError, rf"{WEIGHTS} is [\d,]+ bytes, but its config .* allows at most"
    )
    assert time.perf_counter() - start < 20  # reading it took 24 s at 4.7 GB RSS


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_config_without_dimensions_still_bounds_the_file(kind: str, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    edit_config(folder, lambda c: c.update(fingerprint=None))
    _declare_huge(folder, ".patch_frozen_keys" if kind == "PATCHER" else "delta_down", [2, 2**27])
    refused_everywhere(build("llama"), folder, kind, AdapterFileError, "allows at most")


# ------------------------------------------------------------------- 8: config refusals name the loaders
CONFIGS = {
    "peft_type LORA": lambda text: json.dumps({**json.loads(text), "peft_type": "LORA"}),
    "a list": lambda text: "[]",
    "an empty object": lambda text: "{}",
    "empty": lambda text: "",
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize(
    ("kind", "loaders"),
    [
        ("PATCHER", r"transformer_patcher\.PatcherModel\.from_pretrained or transformer_patcher\.Patcher"),
        ("DELTA", r"transformer_patcher\.DeltaModel\.from_pretrained"),
    ],
)
def test_config_refusals_name_the_supported_loaders(kind: str, loaders: str, config: str, tmp_path: Path) -> None:
    folder = KINDS[kind][0](tmp_path / "adapter")
    (folder / CONFIG).write_text(CONFIGS[config]((folder / CONFIG).read_text()))
    model = build("llama")
    reference = logits(model, inputs_for(model))
    with pytest.raises(AdapterFileError, match=f"loads with {loaders}, .*plain PeftModel.from_pretrained") as caught:
        KINDS[kind][1](model, folder)
    assert str(folder / CONFIG) in str(caught.value)
    assert untouched(model, reference)
