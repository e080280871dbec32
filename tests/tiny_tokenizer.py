"""A word-level tokenizer over the tiny models' vocabulary, built in memory (nothing to download).

Also the data and the model the editing tests share: a tiny GPT-2 with large initial weights (a default tiny model has
near-uniform logits, so any perturbation flips its argmax) and random sentences over two disjoint word ranges,
``MEMORY_WORDS`` for memory/locality text and ``EDIT_WORDS`` for the examples being edited.
"""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tiny_models import VOCAB

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = [f"w{i}" for i in range(len(SPECIALS), VOCAB)]
MEMORY_WORDS = (len(SPECIALS), VOCAB // 2)  # [low, high) word ids of memory and locality text
EDIT_WORDS = (VOCAB // 2, VOCAB)  # [low, high) word ids of edited examples


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


def random_sentence(generator: torch.Generator, length: int, words: tuple[int, int] = MEMORY_WORDS) -> str:
    """``length`` random words with ids in ``[words[0], words[1])``."""
    return sentence(*torch.randint(words[0], words[1], (length,), generator=generator).tolist())


def random_pairs(
    n: int, seed: int, words: tuple[int, int] = MEMORY_WORDS, length: int = 6, target_length: int = 2
) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of random words: memory, locality or evaluation text for a causal LM."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (random_sentence(generator, length, words), random_sentence(generator, target_length, words)) for _ in range(n)
    ]


def sharp_gpt2_config(**overrides: object) -> tf.GPT2Config:
    """The tiny GPT-2 of ``sharp_gpt2``: initializer_range 1.0 spreads the logits over tens of units."""
    return tf.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=1.0,
        **overrides,
    )


def sharp_gpt2(seed: int = 0) -> tf.GPT2LMHeadModel:
    """A tiny GPT-2 (vocabulary of ``tiny_tokenizer``) with initializer_range 1.0, in eval mode: its logits spread
    over tens of units, so small patch leaks do not flip predictions and inputs have distinct FFN queries."""
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(sharp_gpt2_config()).eval()
