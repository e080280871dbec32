"""A word-level tokenizer over the tiny models' vocabulary, built in memory (nothing to download)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tiny_models import VOCAB

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = [f"w{i}" for i in range(len(SPECIALS), VOCAB)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Token ``wN`` has id N; ids 0–3 are pad, bos, eos and unk. Inputs get a leading [BOS] (the [CLS] read)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def sentence(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)
