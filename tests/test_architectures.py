"""Every registry architecture: 0 patches is bit-identical, a targeted patch is local, save/load is exact."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from helpers import queries
from tiny_models import TINY_MODELS, build, inputs_for, logits
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model, init_key
from transformer_patcher.core.tasks import ClassificationTask
from transformer_patcher.methods.pmet.covariance import _max_positions

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


_SMALL = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8
)
_CLASSIFIER_SIZES = {
    "gpt2": dict(n_embd=16, n_layer=1, n_head=2),
    "opt": dict(ffn_dim=32, word_embed_proj_dim=16),
    "distilbert": dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2),
    "bart": dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2),
}
_LAST = ("gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


@pytest.mark.parametrize("model_type", [*_LAST, "bert", "roberta", "distilbert", "electra", "bart"])
def test_a_classifier_is_read_where_its_head_pools(model_type: str) -> None:
    """Decoder classifiers (a ``score`` head pooling the last token) are read at the last token, encoders and
    seq2seq classifiers at the first; Gemma 3's text classifier reads the last token too."""
    config = tf.AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0)
    for name, value in {**_SMALL, **_CLASSIFIER_SIZES.get(model_type, {})}.items():
        if hasattr(config, name) or model_type in _CLASSIFIER_SIZES:
            setattr(config, name, value)
    model = tf.AutoModelForSequenceClassification.from_config(config)
    task = ClassificationTask.for_model(model, tiny_tokenizer())
    assert task.read_position == ("last" if model_type in _LAST else "first")


def test_pmet_statistics_respect_robertas_position_offset() -> None:
    """RoBERTa's positions start after the padding index: 64 configured positions hold 62 tokens."""
    config = tf.RobertaConfig(vocab_size=64, max_position_embeddings=64, pad_token_id=1, **_SMALL)
    assert _max_positions(tf.RobertaModel(config)) == 62
    assert _max_positions(tf.GPT2LMHeadModel(tf.GPT2Config(n_positions=64, **_CLASSIFIER_SIZES["gpt2"]))) == 64
