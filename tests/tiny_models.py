"""Tiny config-built models (hidden <= 64, 2 layers) of every registry architecture, for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0)


_STANDARD = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _tiny(cfg_cls, model_cls, **overrides) -> Callable[[], torch.nn.Module]:
    kwargs = {**_STANDARD, "max_position_embeddings": 64, **_COMMON, **overrides}
    return lambda: model_cls(cfg_cls(**kwargs))


def _decoder_llm(cfg_cls, model_cls, **extra) -> Callable[[], torch.nn.Module]:
    return _tiny(cfg_cls, model_cls, num_attention_heads=4, num_key_value_heads=2, **extra)


def _bart_like(cfg_cls, model_cls) -> Callable[[], torch.nn.Module]:
    return lambda: model_cls(
        cfg_cls(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            **_COMMON,
        )
    )


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "bert": _tiny(tf.BertConfig, tf.BertForSequenceClassification),
    "roberta": _tiny(tf.RobertaConfig, tf.RobertaForSequenceClassification, max_position_embeddings=70),
    "electra": _tiny(tf.ElectraConfig, tf.ElectraForSequenceClassification, embedding_size=32),
    "distilbert": lambda: tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **_COMMON)
    ),
    "bart": _bart_like(tf.BartConfig, tf.BartForConditionalGeneration),
    "mbart": _bart_like(tf.MBartConfig, tf.MBartForConditionalGeneration),
    "t5": lambda: tf.T5ForConditionalGeneration(
        tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, **_COMMON)
    ),
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    ),
    "gpt_neox": _tiny(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
    "opt": _tiny(tf.OPTConfig, tf.OPTForCausalLM, ffn_dim=64, word_embed_proj_dim=32),
    "llama": _decoder_llm(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": _decoder_llm(tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": _decoder_llm(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": _decoder_llm(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8),
    "gemma": _decoder_llm(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=8),
    "gemma3_text": _decoder_llm(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=8),
    "phi3": _decoder_llm(tf.Phi3Config, tf.Phi3ForCausalLM, bos_token_id=1, eos_token_id=2),
}


def _t5_config(**extra) -> tf.T5Config:
    return tf.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, **_COMMON, **extra
    )


# Variants the registry treats specially; not part of the per-architecture sweep.
VARIANTS: dict[str, Callable[[], torch.nn.Module]] = {
    "t5-gated": lambda: tf.T5ForConditionalGeneration(_t5_config(feed_forward_proj="gated-gelu")),
    "t5-encoder": lambda: tf.T5EncoderModel(_t5_config()),
    "mixtral": _decoder_llm(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """Build the tiny model ``name`` with deterministic weights, in eval mode."""
    torch.manual_seed(seed)
    return {**TINY_MODELS, **VARIANTS}[name]().eval()


def inputs_for(model: torch.nn.Module, batch: int = 2, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token inputs that every tiny model accepts (decoder ids added for encoder-decoders)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    batch_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        batch_inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length - 1), generator=g)
    return batch_inputs


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
