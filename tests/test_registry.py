"""Finding the FFN: registry, layer_index, explicit names, fallback heuristic, clear refusals."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tiny_models import build, inputs_for, logits
from transformer_patcher import PatcherConfig, UnsupportedArchitectureError, get_patcher_model, resolve_patch_target


def test_layer_index_picks_another_block() -> None:
    target = resolve_patch_target(build("llama"), layer_index=0)
    assert (target.value_module, target.key_module, target.layer) == (
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.gate_proj",
        0,
    )
    with pytest.raises(UnsupportedArchitectureError, match="layer_index=5 is out of range"):
        resolve_patch_target(build("llama"), layer_index=5)


def test_gated_t5_reads_wi_0() -> None:
    target = resolve_patch_target(build("t5-gated"))
    assert target.key_module == "decoder.block.1.layer.2.DenseReluDense.wi_0"
    assert target.activation == "gelu_new"


def test_encoder_only_t5_falls_back_to_the_encoder() -> None:
    target = resolve_patch_target(build("t5-encoder"))
    assert target.value_module == "encoder.block.1.layer.1.DenseReluDense.wo"


@pytest.mark.parametrize(
    ("model", "value", "key"),
    [
        (
            tf.XLMRobertaForSequenceClassification(
                tf.XLMRobertaConfig(
                    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128
                )
            ),
            "roberta.encoder.layer.1.output.dense",
            "roberta.encoder.layer.1.intermediate.dense",
        ),
        (
            tf.MegatronBertForSequenceClassification(
                tf.MegatronBertConfig(
                    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128
                )
            ),
            "bert.encoder.layer.1.output.dense",
            "bert.encoder.layer.1.intermediate.dense",
        ),
    ],
)
def test_fallback_heuristic_for_unregistered_types(model: torch.nn.Module, value: str, key: str) -> None:
    assert model.config.model_type not in ("bert", "roberta")
    target = resolve_patch_target(model)
    assert (target.value_module, target.key_module, target.activation) == (value, key, "gelu")
    patched = get_patcher_model(model.eval(), PatcherConfig())
    assert patched.peft_config["default"].target_modules == [value]


def test_explicit_names_override_the_registry() -> None:
    model = get_patcher_model(
        build("bert"),
        PatcherConfig(
            target_modules=["bert.encoder.layer.0.output.dense"],
            key_module="bert.encoder.layer.0.intermediate.dense",
            patch_activation="relu",
        ),
    )
    config = model.peft_config["default"]
    assert config.target_modules == ["bert.encoder.layer.0.output.dense"]
    assert config.patch_activation == "relu"
    derived = resolve_patch_target(build("gpt2"), target_modules=["transformer.h.0.mlp.c_proj"])
    assert derived.key_module == "transformer.h.0.mlp.c_fc"


def test_explicit_names_that_match_several_modules_are_refused() -> None:
    model = build("bart")
    reference = logits(model, inputs_for(model))
    with pytest.raises(UnsupportedArchitectureError, match=r"exactly one FFN output projection.*matched 4"):
        get_patcher_model(model, PatcherConfig(target_modules=["fc2"]))
    assert torch.equal(logits(model, inputs_for(model)), reference)


def test_explicit_non_projection_is_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="is a LlamaMLP"):
        resolve_patch_target(build("llama"), target_modules=["model.layers.1.mlp"], key_module="model.layers.1.mlp")


def test_model_without_ffn_lists_what_is_supported() -> None:
    class NoFFN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = tf.PretrainedConfig(hidden_size=8, num_hidden_layers=1)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    with pytest.raises(UnsupportedArchitectureError, match=r"Supported model types: bart, bert.*key_module="):
        resolve_patch_target(NoFFN())
