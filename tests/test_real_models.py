"""The adapter on the real pretrained models that ship on PyPI (MiniLM-L6; SmolLM2-135M and Gemma-3-270M are
slow-marked, and Gemma skips unless `make gemma` installed it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from transformer_patcher import PatcherConfig, PatcherModel, get_patcher_model, init_key
from transformer_patcher.core.pretrained import GEMMA3, MINILM, SMOLLM2, resolve_model

CLAIMS = ["Paris is the capital of France.", "The moon is made of green cheese."]


def _resolve(name: str) -> str:
    try:
        return resolve_model(name)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_minilm_patch_fires_on_its_claim_only(tmp_path: Path) -> None:
    path = _resolve(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    batch = tokenizer(CLAIMS, return_tensors="pt", padding=True)
    before = _logits(base, batch)
    model = get_patcher_model(base, PatcherConfig(patch_activation="relu"))
    config = model.peft_config["default"]
    assert config.target_modules == ["bert.encoder.layer.5.output.dense"]
    assert config.key_module == "bert.encoder.layer.5.intermediate.dense"
    assert torch.equal(_logits(model, batch), before)

    layer = model.patch_layer()
    with layer.capture() as record:
        _logits(model, batch)
    first = record.query[0][batch["attention_mask"][0].bool()]
    # Fires on the [CLS] query of the second claim (where the head reads), exactly silent on the first claim.
    key = init_key(record.query[1, 0], 2.0, silent=first)
    layer.add_patches(key, -1.0, torch.randn(layer.output_dim) * 10, edit_id=1)
    layer.commit()
    after = _logits(model, batch)
    assert not torch.allclose(after[1], before[1], atol=1e-3)
    assert torch.allclose(after[0], before[0], atol=1e-3)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    assert torch.equal(_logits(PatcherModel.from_pretrained(fresh, tmp_path), batch), after)


@pytest.mark.slow
def test_smollm2_gguf_patch_round_trip(tmp_path: Path) -> None:
    path = _resolve(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    batch = tokenizer(["Question: What is the capital of France?\nAnswer:"], return_tensors="pt")
    before = _logits(base, batch)
    model = get_patcher_model(base, PatcherConfig())
    assert model.peft_config["default"].target_modules == ["model.layers.29.mlp.down_proj"]
    assert model.peft_config["default"].patch_activation == "silu"
    assert torch.equal(_logits(model, batch), before)
    layer = model.patch_layer()
    layer.add_patches(torch.randn(4, 576) * 0.05, torch.zeros(4), torch.randn(4, 576), edit_id=[1, 1, 2, 2])
    layer.commit()
    after = _logits(model, batch)
    assert not torch.equal(after, before)
    model.save_pretrained(tmp_path)
    reloaded = PatcherModel.from_pretrained(model.unload(), tmp_path)
    assert torch.equal(_logits(reloaded, batch), after)


@pytest.mark.slow
def test_gemma3_patches_last_ffn_and_empty_patch_keeps_generation() -> None:
    """A second decoder family: the GELU-gated Gemma-3 FFN is found, and an empty patch set changes no token."""
    path = _resolve(GEMMA3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(base).__name__ == "Gemma3ForCausalLM" and base.config.model_type == "gemma3_text"
    batch = tokenizer(["The mother tongue of Danielle Darrieux is"], return_tensors="pt")
    greedy = {"max_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        before = base.generate(**batch, **greedy)
    model = get_patcher_model(base, PatcherConfig())
    config = model.peft_config["default"]
    assert config.target_modules == ["model.layers.17.mlp.down_proj"]
    assert config.key_module == "model.layers.17.mlp.gate_proj"
    assert model.patch_layer().num_patches() == 0
    with torch.no_grad():
        after = model.generate(**batch, **greedy)
    assert torch.equal(after, before)
    assert "French" in tokenizer.decode(after[0, batch["input_ids"].shape[1] :])


MEMORY_SENTENCES = [
    f"{subject} {verb} {thing}."
    for subject in ("The city", "A river", "My neighbour", "The committee", "This novel", "The old bridge")
    for verb in ("was built near", "is famous for", "was written about", "rarely mentions")
    for thing in ("the harbour", "a long war", "three kings", "the northern mountains", "its music")
]


def test_minilm_editor_fixes_a_claim_and_keeps_memory_predictions() -> None:
    """The trained editor on real MiniLM: the claim flips to its target and memory sentences keep their predictions."""
    from transformer_patcher.experiments.sme import score_pairs
    from transformer_patcher.methods.patcher import (
        EditConfig,
        EditExample,
        MemoryBank,
        PatchTrainer,
        collect_queries,
        task_for_model,
    )

    path = _resolve(MINILM)
    torch.manual_seed(0)
    model = get_patcher_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval())
    task = task_for_model(model, AutoTokenizer.from_pretrained(path))
    layer = model.base_model.patch_layer()
    pairs = [(text, 0) for text in MEMORY_SENTENCES]
    memory = MemoryBank(collect_queries(model, layer, task, pairs, 1000, progress=False))
    before = [o.prediction for o in score_pairs(model, task, pairs)]
    trainer = PatchTrainer(model, task, EditConfig(), memory)
    claim = CLAIMS[1]
    wrong_label = 1 - int(score_pairs(model, task, [(claim, 0)])[0].prediction)

    record = trainer.edit(EditExample(claim, wrong_label), edit_id=0)

    assert record.needed and record.success and record.neurons == 1
    assert trainer.check(EditExample(claim, wrong_label)) == (True, 0)
    after = [o.prediction for o in score_pairs(model, task, pairs)]
    assert sum(a == b for a, b in zip(after, before, strict=True)) / len(pairs) >= 0.95
