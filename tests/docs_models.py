"""Tiny stand-ins for the real models that the docs' code blocks name, so every block runs in the default test suite.

A stand-in is saved like a real model folder: a 10-block Llama (enough blocks for PMET's SmolLM2 layers 4–8) over a
byte-level BPE tokenizer trained in memory on a little English, with SmolLM2's chat template, so any prompt and any
target can be written, asked raw or through the chat template. :func:`prelude` is the code a docs page runs first to
map the short names onto these folders (``tests/test_docs.py``; ``TRANSFORMER_PATCHER_DOCS_MODELS=real`` runs the
real models instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from transformer_patcher.core.pretrained import GEMMA3, SMOLLM2
from transformer_patcher.data.benchmarks import sample_memory_pairs

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (  # SmolLM2-135M-Instruct's, without its default system prompt
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = [f"{text} {target}" for text, target in sample_memory_pairs()]
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_docs_models(root: Path) -> dict[str, str]:
    """Save the stand-ins under ``root``; returns short name → folder."""
    folder = root / "tiny-llama"
    if not (folder / "config.json").is_file():
        tokenizer = _tokenizer()
        torch.manual_seed(0)
        config = tf.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=10,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        tf.LlamaForCausalLM(config).eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return {SMOLLM2: str(folder), GEMMA3: str(folder)}


def prelude(standins: dict[str, str]) -> str:
    """Python source that makes ``transformer_patcher`` resolve the short names to ``standins``."""
    return (
        "import transformer_patcher.core.pretrained as _pretrained\n"
        f"_standins = {json.dumps(standins)}\n"
        "_real_resolve = _pretrained.resolve_model\n"
        "_pretrained.resolve_model = lambda name: _standins.get(name) or _real_resolve(name)\n"
    )
