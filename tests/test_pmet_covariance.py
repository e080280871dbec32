"""Second moments of FFN keys (PMET's C): values, padding, caching, warnings, on tiny config-built models."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tiny_models import build
from tiny_tokenizer import random_sentence, sharp_gpt2, tiny_tokenizer
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.methods.pmet import covariance
from transformer_patcher.methods.pmet.covariance import SecondMoment, collect_second_moments, second_moments


def _texts(n: int = 7, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [random_sentence(generator, 3 + 2 * i) for i in range(n)]  # different lengths: padding in every batch


def test_gpt2_moments_match_the_activation_outputs() -> None:
    """C is E[k kᵀ] of the FFN activation output (the input of c_proj), over every real token and nothing else."""
    model, tokenizer, texts = sharp_gpt2(), tiny_tokenizer(), _texts()
    moments = collect_second_moments(model, tokenizer, texts, layers=[0, -1], batch_size=3, progress=False)
    for layer, index in ((0, 0), (-1, 1)):
        keys: list[torch.Tensor] = []
        act = model.transformer.h[index].mlp.act
        handle = act.register_forward_hook(lambda m, a, out, keys=keys: keys.append(out[0]))
        with torch.no_grad():
            for text in texts:  # one at a time: no padding at all
                model(**tokenizer(text, return_tensors="pt"))
        handle.remove()
        stacked = torch.cat(keys).double()
        moment = moments[layer]
        assert moment.module == f"transformer.h.{index}.mlp.c_proj"
        assert moment.tokens == len(stacked) == sum(len(t.split()) + 1 for t in texts)  # + the [BOS] token
        assert moment.matrix.dtype == torch.float64
        torch.testing.assert_close(moment.matrix, stacked.T @ stacked / len(stacked), rtol=1e-5, atol=1e-6)


def test_batching_does_not_change_llama_moments() -> None:
    model, tokenizer, texts = build("llama"), tiny_tokenizer(), _texts()
    one = collect_second_moments(model, tokenizer, texts, layers=[-1], batch_size=1, progress=False)[-1]
    many = collect_second_moments(model, tokenizer, texts, layers=[-1], batch_size=4, progress=False)[-1]
    assert one.module.endswith("mlp.down_proj") and one.tokens == many.tokens
    torch.testing.assert_close(one.matrix, many.matrix, rtol=1e-5, atol=1e-7)
    assert torch.linalg.eigvalsh(one.matrix).min() > -1e-9  # a second moment is positive semi-definite


def test_cache_round_trip_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, texts = sharp_gpt2(), tiny_tokenizer(), _texts()
    first = second_moments(model, tokenizer, texts, [0, -1], cache_dir=tmp_path, progress=False)
    files = sorted(tmp_path.glob("mom2-*.safetensors"))
    assert len(files) == 2

    def fail(*args, **kwargs):
        raise AssertionError("statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(covariance, "collect_second_moments", fail)
    again = second_moments(model, tokenizer, texts, [0, -1], cache_dir=tmp_path, progress=False)
    for layer in (0, -1):
        assert torch.equal(again[layer].matrix, first[layer].matrix) and again[layer].tokens == first[layer].tokens
    monkeypatch.undo()

    other_text = second_moments(model, tokenizer, texts[:-1], [0], cache_dir=tmp_path, progress=False)
    assert not torch.equal(other_text[0].matrix, first[0].matrix)  # another corpus: another cache entry
    key_0 = covariance.stats_key(model, covariance.ffn_target(model, 0), texts, 128)
    key_1 = covariance.stats_key(model, covariance.ffn_target(model, -1), texts, 128)
    shutil.copy(tmp_path / f"mom2-{key_1[:24]}.safetensors", tmp_path / f"mom2-{key_0[:24]}.safetensors")
    with pytest.raises(AdapterFileError, match="another model, layer or text"):
        second_moments(model, tokenizer, texts, [0], cache_dir=tmp_path, progress=False)
    (tmp_path / f"mom2-{key_0[:24]}.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="cannot read"):
        second_moments(model, tokenizer, texts, [0], cache_dir=tmp_path, progress=False)


def test_few_tokens_warn_and_ridge_regularizes(caplog: pytest.LogCaptureFixture) -> None:
    model, tokenizer = sharp_gpt2(), tiny_tokenizer()
    with caplog.at_level(logging.WARNING):
        moment = collect_second_moments(model, tokenizer, _texts(2), layers=[-1], progress=False)[-1]
    assert "rank-deficient" in caplog.text  # 2 short texts for 128-dimensional keys
    assert torch.linalg.matrix_rank(moment.matrix) < moment.matrix.shape[0]
    regularized = moment.regularized(0.1)
    mean_eigenvalue = torch.trace(moment.matrix) / moment.matrix.shape[0]
    torch.testing.assert_close(regularized - moment.matrix, 0.1 * mean_eigenvalue * torch.eye(128, dtype=torch.float64))
    assert torch.linalg.eigvalsh(regularized).min() > 0
    with pytest.raises(ValueError, match="ridge"):
        SecondMoment("m", moment.matrix, 1).regularized(-1.0)
    with pytest.raises(ValueError, match="no text"):
        collect_second_moments(model, tokenizer, [], layers=[-1], progress=False)


def test_the_cache_key_is_exact_and_the_same_on_any_number_of_threads() -> None:
    """The key does not move with float rounding: the fingerprint's sketches are dot products whose last bits change
    with the thread count, and a cache keyed on them was missed by a two-thread run of a one-thread run's model. It
    does move with one weight of the FFN it reads, and with a whole tensor of an earlier block."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=576,  # SmolLM2-135M's widths: big enough for the sketches' dot products to use every thread
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    model, texts = LlamaForCausalLM(config), _texts()
    target = covariance.ffn_target(model, -1)
    threads = torch.get_num_threads()
    try:
        keys = []
        for n in (1, 2):
            torch.set_num_threads(n)
            keys.append(covariance.stats_key(model, target, texts, 128))
    finally:
        torch.set_num_threads(threads)
    assert keys[0] == keys[1]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
        one_weight = covariance.stats_key(model, target, texts, 128)
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
        earlier_block = covariance.stats_key(model, target, texts, 128)
    assert len({keys[0], one_weight, earlier_block}) == 3
