"""PMET's context templates: sampled prefixes after the start word alone (the official code) or after the tokenizer's
start-of-text token, which a tokenizer that adds none (SmolLM2's) would otherwise leave out."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_tokenizer import SPECIALS, WORDS, sharp_gpt2, tiny_tokenizer
from transformer_patcher.methods.pmet import PMETHyperParams, context_templates
from transformer_patcher.methods.pmet.templates import document_start

BOS, EOS = 1, 2


def _plain_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """The tiny word-level vocabulary with the start words in it, adding no special token when encoding."""
    words = [*WORDS[:-5], "The", "Therefore", "Because", "I", "You"]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials: dict[str, Any] = {"pad_token": "[PAD]", "eos_token": "[EOS]", "unk_token": "[UNK]"}
    if bos:
        specials["bos_token"] = "[BOS]"
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def test_a_text_starts_with_the_start_token_the_tokenizer_does_not_add() -> None:
    assert document_start(_plain_tokenizer()) == [BOS]
    assert document_start(_plain_tokenizer(bos=False)) == [EOS]  # GPT-2's document separator
    assert document_start(tiny_tokenizer()) == []  # it puts [BOS] first itself


def _generated(tokenizer: Any, start: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[str]], list[list[int]]]:
    """The templates, and the ids each sample was started from, each followed by how many tokens it sampled."""
    model = sharp_gpt2()
    starts: list[list[int]] = []
    generate = model.generate

    def spy(**inputs: Any) -> torch.Tensor:
        starts.append(inputs["input_ids"][0].tolist())
        output = generate(**inputs)
        starts[-1].append(output.shape[1] - len(starts[-1]))
        return output

    monkeypatch.setattr(model, "generate", spy)
    return context_templates(model, tokenizer, ((6, 3),), start=start), starts


def test_document_templates_are_sampled_after_the_start_token(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = _plain_tokenizer()
    bare, bare_starts = _generated(tokenizer, "bare", monkeypatch)
    document, document_starts = _generated(tokenizer, "document", monkeypatch)
    words = [tokenizer("The")["input_ids"], tokenizer("Therefore")["input_ids"], tokenizer("Because")["input_ids"]]
    assert bare_starts == [[*ids, 5] for ids in words]  # the official code: the start word alone, 6 tokens in all
    assert document_starts == [[BOS, *ids, 5] for ids in words]  # as many tokens after the start token
    for templates in (bare, document):
        assert templates[0] == ["{}"]
        for template, word in zip(templates[1], ("The", "Therefore", "Because"), strict=True):
            assert template.startswith(word + " ") and template.endswith(". {}")
            assert "[BOS]" not in template
    assert document != bare  # the start token changes what is sampled
    # a tokenizer that adds its BOS itself samples the same either way
    assert (
        _generated(tiny_tokenizer(), "document", monkeypatch)[0] == _generated(tiny_tokenizer(), "bare", monkeypatch)[0]
    )


def test_an_unknown_template_start_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="start must be one of"):
        context_templates(sharp_gpt2(), tiny_tokenizer(), ((6, 1),), start="chat")
    with pytest.raises(ValueError, match="template_start must be one of"):
        PMETHyperParams(template_start="chat")


def test_the_settings_sample_their_own_templates() -> None:
    """``PMETHyperParams.templates`` samples with the settings' lengths and start, as every caller needs both."""
    tokenizer, settings = (
        _plain_tokenizer(),
        PMETHyperParams(context_template_lengths=((6, 2),), template_start="document"),
    )
    expected = context_templates(sharp_gpt2(), tokenizer, ((6, 2),), start="document")
    assert settings.templates(sharp_gpt2(), tokenizer) == expected
    assert expected != context_templates(sharp_gpt2(), tokenizer, ((6, 2),))
