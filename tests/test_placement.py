"""accelerate placement: patches sit on the execution device of the FFN they extend, even when it is offloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import build, inputs_for, logits
from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model

OFFLOAD_MAPS = {
    "cpu-offload": {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    },
    "disk-offload": {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    },
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    build("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("placement", sorted(OFFLOAD_MAPS))
def test_patches_on_execution_device_of_offloaded_ffn(llama_dir: Path, tmp_path: Path, placement: str) -> None:
    reference_model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    batch = inputs_for(reference_model)
    reference = logits(reference_model, batch)
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, device_map=OFFLOAD_MAPS[placement], offload_folder=str(tmp_path / "offload")
    ).eval()
    if placement == "disk-offload":
        assert base.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    model = get_patcher_model(base, PatcherConfig())
    layer = model.patch_layer()
    assert {t.device.type for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]} <= {"cpu"}
    assert all(p.device.type == "cpu" for name, p in layer.named_parameters() if name.startswith("patch_"))
    assert torch.allclose(logits(model, batch), reference, atol=1e-6)
    assert (
        model.peft_config["default"].fingerprint["weights_sha256"]
        == get_patcher_model(build("llama"), PatcherConfig()).peft_config["default"].fingerprint["weights_sha256"]
    )

    torch.manual_seed(0)
    layer.add_patches(torch.randn(2, 32), torch.zeros(2), torch.randn(2, 32) * 5, edit_id=1)
    assert not torch.allclose(logits(model, batch), reference, atol=1e-4)
    assert all(t.device.type == "cpu" for t in layer.patch_keys.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_patches_on_a_half_precision_base(dtype: torch.dtype, tmp_path: Path) -> None:
    base = build("llama").to(dtype)
    batch = inputs_for(base)
    reference = logits(base, batch)
    model = get_patcher_model(base, PatcherConfig())
    layer = model.patch_layer()
    assert torch.equal(logits(model, batch), reference)
    torch.manual_seed(0)
    layer.add_patches(torch.randn(2, 32), torch.zeros(2), torch.randn(2, 32) * 5, edit_id=1)
    layer.commit()
    assert layer.patch_frozen_keys["default"].dtype == torch.float32
    out = logits(model, batch)
    assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, reference)
    model.save_pretrained(tmp_path)
    again = PatcherModel.from_pretrained(build("llama").to(dtype), tmp_path)
    assert again.patch_layer().patch_frozen_keys["default"].dtype == torch.float32
    assert torch.equal(logits(again, batch), out)


def test_patch_dtype_none_follows_the_base() -> None:
    model = get_patcher_model(build("llama").to(torch.bfloat16), PatcherConfig(patch_dtype=None))
    assert model.patch_layer().patch_frozen_keys["default"].dtype == torch.bfloat16
