"""Bad input gets a clear error and changes nothing: adapter files, fingerprints, patches, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tiny_models import build, inputs_for, logits
from transformer_patcher import (
    AdapterFileError,
    FingerprintMismatchError,
    InvalidPatchError,
    PatcherConfig,
    PatcherLayer,
    PatcherModel,
    get_patcher_model,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = get_patcher_model(build("llama"), PatcherConfig())
    layer = model.patch_layer()
    layer.add_patches(torch.randn(3, 32), torch.zeros(3), torch.randn(3, 32), edit_id=[1, 2, 3])
    layer.commit()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def assert_untouched(model: torch.nn.Module, reference: torch.Tensor) -> None:
    assert not any(isinstance(m, PatcherLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    assert torch.equal(logits(model, inputs_for(model)), reference)


def load_both_ways(model: torch.nn.Module, path: Path, error: type[Exception], match: str) -> None:
    reference = logits(model, inputs_for(model))
    with pytest.raises(error, match=match):
        PatcherModel.from_pretrained(model, path)
    assert_untouched(model, reference)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(model, path)
    assert_untouched(model, reference)


def test_adapter_for_another_base_model_is_refused(saved: Path) -> None:
    load_both_ways(build("llama", seed=1), saved, FingerprintMismatchError, "weights of the patched FFN differ")


def test_adapter_for_another_architecture_is_refused(saved: Path) -> None:
    load_both_ways(build("qwen2"), saved, FingerprintMismatchError, "model_type: adapter 'llama', model 'qwen2'")


def test_same_model_at_lower_precision_is_accepted(saved: Path) -> None:
    model = PatcherModel.from_pretrained(build("llama").to(torch.bfloat16), saved)
    assert model.patch_layer().num_patches() == 3


def test_fingerprint_check_can_be_bypassed_explicitly(saved: Path) -> None:
    with pytest.warns(UserWarning, match="check_fingerprint=False: .* may not belong to this model"):
        model = PatcherModel.from_pretrained(build("llama", seed=1), saved, check_fingerprint=False)
    assert model.patch_layer().num_patches() == 3


def test_corrupted_safetensors_is_refused(saved: Path) -> None:
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    load_both_ways(build("llama"), saved, AdapterFileError, "not a readable safetensors file")


def test_garbage_header_is_refused(saved: Path) -> None:
    (saved / WEIGHTS).write_bytes(b"\xff" * 64)
    load_both_ways(build("llama"), saved, AdapterFileError, "not a readable safetensors file")


def _rewrite(saved: Path, edit) -> None:
    tensors = load_file(saved / WEIGHTS)
    edit(tensors)
    save_file(tensors, saved / WEIGHTS, metadata={"format": "pt"})


def test_shape_mismatch_is_refused(saved: Path) -> None:
    key = next(k for k in load_file(saved / WEIGHTS) if k.endswith("patch_frozen_values"))
    _rewrite(saved, lambda t: t.__setitem__(key, torch.randn(3, 31)))
    load_both_ways(build("llama"), saved, AdapterFileError, "has shape .*, expected")


def test_nan_in_file_is_refused(saved: Path) -> None:
    key = next(k for k in load_file(saved / WEIGHTS) if k.endswith("patch_frozen_keys"))
    _rewrite(saved, lambda t: t[key].__setitem__((0, 0), float("nan")))
    load_both_ways(build("llama"), saved, AdapterFileError, "NaN or inf")


def test_missing_and_extra_tensors_are_refused(saved: Path) -> None:
    key = next(k for k in load_file(saved / WEIGHTS) if k.endswith("patch_frozen_bias"))
    _rewrite(saved, lambda t: t.pop(key))
    load_both_ways(build("llama"), saved, AdapterFileError, "lacks tensors")


def test_unexpected_tensor_is_refused(saved: Path) -> None:
    _rewrite(saved, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2, 2)))
    load_both_ways(build("llama"), saved, AdapterFileError, "unexpected tensor")


def test_patch_count_disagreeing_with_config_is_refused(saved: Path) -> None:
    config = json.loads((saved / CONFIG).read_text())
    config["num_patches"] = 7
    (saved / CONFIG).write_text(json.dumps(config))
    load_both_ways(build("llama"), saved, AdapterFileError, "holds 3 patches but its config says num_patches=7")


def test_unknown_config_field_is_refused(saved: Path) -> None:
    config = json.loads((saved / CONFIG).read_text())
    config["rank"] = 8
    (saved / CONFIG).write_text(json.dumps(config))
    load_both_ways(build("llama"), saved, AdapterFileError, "Additional properties are not allowed")


def test_non_finite_config_value_is_refused(saved: Path) -> None:
    text = (saved / CONFIG).read_text().replace('"init_value_scale": 10.0', '"init_value_scale": NaN')
    (saved / CONFIG).write_text(text)
    load_both_ways(build("llama"), saved, AdapterFileError, "init_value_scale")


def test_pickled_weights_are_never_read(saved: Path) -> None:
    (saved / WEIGHTS).rename(saved / "adapter_model.bin")
    load_both_ways(build("llama"), saved, AdapterFileError, "unpickling can run arbitrary code")


def test_wrong_architecture_gets_a_clear_error() -> None:
    from transformer_patcher import UnsupportedArchitectureError

    model = build("mixtral")
    reference = logits(model, inputs_for(model))
    with pytest.raises(UnsupportedArchitectureError, match=r"mixture of experts.*target_modules="):
        get_patcher_model(model, PatcherConfig())
    assert_untouched(model, reference)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keys": torch.full((1, 32), float("nan"))}, "keys contains NaN"),
        ({"values": torch.full((1, 32), float("inf"))}, "values contains NaN"),
        ({"keys": torch.randn(1, 31)}, r"keys must have shape \(n, 32\)"),
        ({"biases": torch.zeros(2)}, "same n >= 1 patches"),
        ({"edit_id": [1, 2]}, "one id or one per patch"),
        ({"keys": torch.ones(1, 32, dtype=torch.int64)}, "floating point"),
    ],
)
def test_invalid_patches_change_nothing(kwargs: dict, match: str) -> None:
    model = get_patcher_model(build("llama"), PatcherConfig())
    layer = model.patch_layer()
    layer.add_patches(torch.randn(1, 32), 0.0, torch.randn(1, 32), edit_id=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    arguments = {"keys": torch.randn(1, 32), "biases": torch.zeros(1), "values": torch.randn(1, 32), "edit_id": 1}
    arguments.update(kwargs)
    with pytest.raises(InvalidPatchError, match=match):
        layer.add_patches(**arguments)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.peft_config["default"].num_patches == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_value_scale": float("nan")}, "init_value_scale"),
        ({"init_value_scale": -1.0}, "init_value_scale"),
        ({"num_patches": -1}, "num_patches"),
        ({"patch_activation": "nope"}, "Unknown patch_activation"),
        ({"patch_dtype": "int8"}, "patch_dtype"),
    ],
)
def test_invalid_config_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PatcherConfig(**kwargs)


def test_unknown_config_argument() -> None:
    with pytest.raises(TypeError, match="rank"):
        PatcherConfig(rank=8)  # type: ignore[call-arg]
