"""Every registry architecture: 0 patches is bit-identical, a targeted patch is local, save/load is exact."""

from __future__ import annotations

import pytest
import torch

from helpers import queries
from tiny_models import TINY_MODELS, build, inputs_for, logits
from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model, init_key

EXPECTED_TARGETS = {
    "bert": ("bert.encoder.layer.1.output.dense", "bert.encoder.layer.1.intermediate.dense"),
    "roberta": ("roberta.encoder.layer.1.output.dense", "roberta.encoder.layer.1.intermediate.dense"),
    "electra": ("electra.encoder.layer.1.output.dense", "electra.encoder.layer.1.intermediate.dense"),
    "distilbert": ("distilbert.transformer.layer.1.ffn.lin2", "distilbert.transformer.layer.1.ffn.lin1"),
    "bart": ("model.decoder.layers.1.fc2", "model.decoder.layers.1.fc1"),
    "mbart": ("model.decoder.layers.1.fc2", "model.decoder.layers.1.fc1"),
    "t5": ("decoder.block.1.layer.2.DenseReluDense.wo", "decoder.block.1.layer.2.DenseReluDense.wi"),
    "gpt2": ("transformer.h.1.mlp.c_proj", "transformer.h.1.mlp.c_fc"),
    "gpt_neox": ("gpt_neox.layers.1.mlp.dense_4h_to_h", "gpt_neox.layers.1.mlp.dense_h_to_4h"),
    "opt": ("model.decoder.layers.1.fc2", "model.decoder.layers.1.fc1"),
    "llama": ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"),
    "mistral": ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"),
    "qwen2": ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"),
    "qwen3": ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"),
    "gemma": ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"),
    "gemma3_text": ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"),
    "phi3": ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_up_proj"),
}
ARCHS = sorted(TINY_MODELS)


def test_every_tiny_model_has_an_expected_target() -> None:
    assert set(EXPECTED_TARGETS) == set(TINY_MODELS)


@pytest.mark.parametrize("arch", ARCHS)
def test_resolves_last_ffn_and_zero_patches_is_identical(arch: str) -> None:
    base = build(arch)
    batch = inputs_for(base)
    reference = logits(base, batch)
    model = get_patcher_model(base, PatcherConfig())
    config = model.peft_config["default"]
    assert (config.target_modules[0], config.key_module) == EXPECTED_TARGETS[arch]
    assert config.num_patches == 0
    assert torch.equal(logits(model, batch), reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_targeted_patch_changes_its_input_only_and_round_trips(arch: str, tmp_path) -> None:
    model = get_patcher_model(build(arch), PatcherConfig(patch_activation="relu"))
    layer = model.patch_layer()
    target_batch, other_batch = inputs_for(model, batch=1, seed=11), inputs_for(model, batch=1, seed=12)
    before_target, before_other = logits(model, target_batch), logits(model, other_batch)
    q_target, q_other = queries(model, layer, target_batch), queries(model, layer, other_batch)
    # Fires (pre-activation 1 - 0.5) on the first query of the target input; exactly 0 - 0.5 on the other input.
    key = init_key(q_target[0], 1.0, silent=q_other)
    layer.add_patches(key, -0.5, torch.randn(layer.output_dim) * 20, edit_id=3)
    layer.commit()

    assert not torch.allclose(logits(model, target_batch), before_target, atol=1e-4)
    assert torch.equal(logits(model, other_batch), before_other)

    model.save_pretrained(tmp_path)
    reloaded = PatcherModel.from_pretrained(build(arch), tmp_path)
    assert torch.equal(logits(reloaded, target_batch), logits(model, target_batch))
    assert torch.equal(logits(reloaded, other_batch), before_other)
    assert reloaded.patch_layer().edit_ids().tolist() == [3]
