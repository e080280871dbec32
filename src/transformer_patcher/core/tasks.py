"""Tasks: how an example becomes model inputs, where the task reads the model, its edit loss and its correctness test.

A task turns examples into a :class:`Batch` of model inputs plus *reads*: (row, position, label) triples. A read is
one place where the model's output is judged — the [CLS] logit of a classifier, or the position that predicts one
target token of an answer. Reads are also where patches look: the FFN query at a read's position is what a new patch
keys on (one patch per wrong read, at most ``max_patches``), and what the memory stores for irrelevant examples.

Every read sits at a sequence position of the patched FFN, and after the last FFN nothing mixes positions, so the
output at a read depends only on the FFN output at that same position. Greedy generation reproduces a target exactly
iff every teacher-forced read is argmax-correct, so "needs an edit" for generation is decided from one forward pass.

Length: a task encodes at most ``max_length`` tokens per sequence (128 by default; ``for_model`` lowers it to the
model's position limit when the config states one). Longer *inputs* are truncated to their first tokens, with an
:class:`InputTruncatedWarning`; for a causal LM the prompt keeps its first ``max_length - len(answer)`` tokens so the
answer always fits. A generation *target* that does not fit (more than ``max_length - 1`` tokens) is refused with
:class:`~transformer_patcher.core.errors.InvalidExampleError`, since training on a cut answer would teach a
different one.
Inputs are rendered by the task's :class:`~transformer_patcher.core.prompts.PromptFormat` (raw text, the chat
template, or a template string) before they are encoded; for a causal LM the format also says what ends an answer
(the chat template's end-of-turn token, or EOS on request), which then counts as one more read, so "correct" means
greedy generation writes the answer and stops.

Text is used as given: unknown characters in an input (NUL, zero-width or astral characters a vocabulary lacks) map to
the tokenizer's unknown token; in a target they are refused.
"""

from __future__ import annotations

import copy
import inspect
import json
import operator
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transformer_patcher.core.errors import InvalidExampleError, PromptFormatError
from transformer_patcher.core.placement import execution_device
from transformer_patcher.core.prompts import CHAT, Prompter, PromptFormat


class InputTruncatedWarning(UserWarning):
    """An input was longer than the task's ``max_length`` (or the model's positions) and was cut to fit."""


def _short(text: str, limit: int = 60) -> str:
    """``repr`` of ``text``, shortened for error messages."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def position_limit(config: Any) -> int | None:
    """How many positions the model can encode: learned absolute positions bound it, relative ones (T5) do not."""
    if config is None or getattr(config, "model_type", None) in ("t5", "mt5", "umt5", "longt5"):
        return None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    if getattr(config, "model_type", None) in ("roberta", "xlm-roberta", "camembert"):
        limit -= (config.pad_token_id or 0) + 1  # positions are counted from padding_idx + 1
    return limit


def on_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it on ``device``: a tensor, a dict of values, or a dataclass of them (a copy;
    anything else unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: on_device(v, device) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: on_device(getattr(value, f.name), device) for f in fields(value) if f.init})
    return value


@dataclass
class Batch:
    """Padded model inputs plus the reads: ``rows[j], cols[j]`` is where read ``j`` looks, ``labels[j]`` its answer."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    example: torch.Tensor  # index of the example each read belongs to
    extra: dict[str, Any] = field(default_factory=dict)  # forward kwargs that are not tensors of the batch

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        return {**self.inputs, **self.extra}

    def first_reads(self) -> torch.Tensor:
        """A mask over the reads: the first read of each example (where its answer starts)."""
        first = torch.ones_like(self.example, dtype=torch.bool)
        first[1:] = self.example[1:] != self.example[:-1]
        return first


@dataclass
class _Encoded:
    ids: list[int]
    cols: list[int]
    labels: list[int]
    decoder_ids: list[int] | None = None


class Task(ABC):
    """Base of the three task kinds. Subclasses define encoding, reading logits and the edit loss."""

    kind: str
    formats_refused: tuple[str, ...] = ()  # "chat" and/or "eos"
    formats_refused_because = ""

    def __init__(self, tokenizer: Any, max_length: int = 128, prompt_format: PromptFormat | str | None = None) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._set_format(PromptFormat.coerce(prompt_format))

    def _set_format(self, prompt_format: PromptFormat) -> None:
        self._check_format(prompt_format)
        self.prompt_format = prompt_format
        self.prompter = Prompter(self.tokenizer, prompt_format)

    def _check_format(self, prompt_format: PromptFormat) -> None:
        """Refuse a format the task kind cannot use (see ``formats_refused``)."""
        refused = (prompt_format.kind == CHAT and "chat" in self.formats_refused) or (
            prompt_format.append_eos and "eos" in self.formats_refused
        )
        if refused:
            raise PromptFormatError(
                f"a {self.kind} task cannot use prompt_format {prompt_format.name!r}: {self.formats_refused_because}"
            )

    def formatted(self, prompt_format: PromptFormat | str | None) -> Task:
        """The same task reading its inputs in another prompt format (this task is unchanged)."""
        other = copy.copy(self)
        other._set_format(PromptFormat.coerce(prompt_format))
        return other

    @property
    def signature(self) -> str:
        """What decides how an example is encoded: the task kind and the prompt format (memory-cache keys use it)."""
        return f"{self.kind}|{json.dumps(self.prompt_format.to_dict(), sort_keys=True)}"

    # ------------------------------------------------------------------------------------------- encoding
    def _raw_tokens(self, text: str, what: str, add_special_tokens: bool, render: bool = False) -> list[int]:
        """All token ids of ``text`` (rendered by the prompt format when ``render``); refused when it is not text,
        is blank or encodes to nothing."""
        if not isinstance(text, str):
            raise InvalidExampleError(f"{what} must be text, got {type(text).__name__}")
        if not text.strip():
            raise InvalidExampleError(f"{what} is empty; every example needs non-empty text")
        source = self.prompter.render(text) if render else text
        ids = list(self.tokenizer(source, add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise InvalidExampleError(f"{what} {_short(text)} encodes to no tokens")
        return ids

    def check_text(self, text: str, what: str = "the text") -> None:
        """Refuse (InvalidExampleError) an input the task cannot read: not text, blank, or no tokens."""
        self._raw_tokens(text, what, add_special_tokens=False)

    def _tokens(self, text: str, what: str, limit: int | None = None) -> list[int]:
        """Token ids of the input ``text`` as the prompt format renders it; beyond ``limit`` (default
        ``max_length``) cut to the first ones, with a warning."""
        ids = self._raw_tokens(text, what, self.prompter.add_special_tokens, render=True)
        limit = self.max_length if limit is None else limit
        if len(ids) > limit:
            warnings.warn(
                f"{what} is longer than the {limit} tokens that fit (max_length={self.max_length}) and was truncated "
                "to its first tokens",
                InputTruncatedWarning,
                stacklevel=4,
            )
            ids = ids[:limit]
        return ids

    def _target_tokens(self, text: str, room: int) -> list[int]:
        """Token ids of a generation target; refused when it has unknown tokens or more than ``room`` tokens."""
        ids = self._raw_tokens(text, "the target", add_special_tokens=False)
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            raise InvalidExampleError(
                f"the target {_short(text)} contains text the tokenizer cannot encode (it maps to the unknown token "
                f"{self.tokenizer.unk_token!r}); the model could never produce it"
            )
        if len(ids) > room:
            raise InvalidExampleError(
                f"the target {_short(text)} is {len(ids)} tokens long; at most {room} fit in max_length="
                f"{self.max_length}, and a truncated target would teach a different answer"
            )
        return ids

    def prompt_tokens(self, text: str) -> list[int]:
        """Token ids of the input ``text`` as the model reads it (rendered by the prompt format, cut to max_length)."""
        return self._tokens(text, "the prompt")

    @abstractmethod
    def _encode(self, text: str, target: int | str) -> _Encoded: ...

    def collate(self, pairs: Sequence[tuple[str, int | str]]) -> Batch:
        """Encode (input, target) pairs into one right-padded batch. Raises ``InvalidExampleError`` on bad input."""
        if not pairs:
            raise InvalidExampleError("no examples to encode")
        encoded = [self._encode(text, target) for text, target in pairs]
        width = max(len(e.ids) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows, cols, labels, owner = [], [], [], []
        for i, e in enumerate(encoded):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
            rows += [i] * len(e.cols)
            cols += e.cols
            labels += e.labels
            owner += [i] * len(e.cols)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if encoded[0].decoder_ids is not None:
            dec_width = max(len(e.decoder_ids or []) for e in encoded)
            dec = torch.full((len(encoded), dec_width), self.pad_id, dtype=torch.long)
            dec_mask = torch.zeros_like(dec)
            for i, e in enumerate(encoded):
                dec[i, : len(e.decoder_ids or [])] = torch.tensor(e.decoder_ids)
                dec_mask[i, : len(e.decoder_ids or [])] = 1
            inputs |= {"decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return Batch(inputs, as_long(rows), as_long(cols), as_long(labels), as_long(owner))

    def repeat(self, batch: Batch, copies: int) -> Batch:
        """``copies`` stacked copies of a one-example batch (the paper's repeated edit batch)."""
        n = batch.rows.numel()
        copy_index = torch.arange(copies, device=batch.rows.device).repeat_interleave(n)
        return Batch(
            {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in batch.inputs.items()},
            copy_index * batch.size + batch.rows.repeat(copies),
            batch.cols.repeat(copies),
            batch.labels.repeat(copies),
            batch.example.repeat(copies),
            dict(batch.extra),
        )

    def batch_for(self, model: nn.Module, pairs: Sequence[tuple[str, int | str]]) -> Batch:
        """``collate`` on the model's device plus the model-specific forward kwargs of ``prepare``: what a forward pass
        of ``model`` needs."""
        batch = on_device(self.collate(pairs), execution_device(model))
        limit = position_limit(getattr(model, "config", None))
        if limit is not None:
            for name in ("input_ids", "decoder_input_ids"):
                if name in batch.inputs and batch.inputs[name].shape[1] > limit:
                    raise InvalidExampleError(
                        f"an example encodes to {batch.inputs[name].shape[1]} tokens ({name}) but the model has "
                        f"{limit} positions; build the task with max_length <= {limit} (for_model does this)"
                    )
        return self.prepare(model, batch)

    # ---------------------------------------------------------------------------------------------- reading
    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """Hook for model-specific forward kwargs (e.g. computing logits only at read positions)."""
        return batch

    @abstractmethod
    def read_logits(self, output: Any, batch: Batch) -> torch.Tensor:
        """Logits at every read, shape (n_reads, n_classes_or_vocab)."""

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per read: is the model's prediction the label?"""
        return logits.argmax(-1) == labels

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def margins(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per read: the label's logit minus the best other logit (positive: the read is right)."""
        logits = logits.float()
        target = logits.gather(1, labels[:, None]).squeeze(1)
        return target - logits.scatter(1, labels[:, None], float("-inf")).amax(1)

    @abstractmethod
    def edit_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def at_reads(self, values: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-position FFN tensors (queries, patch pre-activations) at the reads: shape (n_reads, last dim)."""
        if values.dim() == 2:  # OPT flattens (batch, time) before its FFN
            values = values.reshape(batch.size, -1, values.shape[-1])
        return values[batch.rows, batch.cols]


class ClassificationTask(Task):
    """Sequence classification: one read at the position the head reads — [CLS] for encoders, else the last token.

    Edit loss follows the official code: binary cross-entropy minus 0.1 × Bernoulli entropy for a single-logit
    head (the paper's FEVER classifier), cross-entropy otherwise.
    """

    kind = "classification"
    formats_refused = ("chat", "eos")
    formats_refused_because = "a classifier reads its input and generates no answer; use 'raw' or a template string"

    def __init__(
        self,
        tokenizer: Any,
        num_labels: int,
        read_position: str = "first",
        entropy_weight: float = 0.1,
        max_length: int = 128,
        prompt_format: PromptFormat | str | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, prompt_format)
        if read_position not in ("first", "last"):
            raise ValueError(f"read_position must be 'first' ([CLS]) or 'last', got {read_position!r}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.read_position = read_position
        self.entropy_weight = entropy_weight

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> ClassificationTask:
        """Read [CLS] on encoder models and the last token on decoder classifiers (what their heads pool).

        transformers names a decoder-only model's sequence-classification head ``score`` (it pools the last
        non-padding token) and an encoder's ``classifier``, so the head says which position the model pools; this
        also covers decoder classifiers that the registry does not list by name (Gemma 3 among them). A head wrapped
        by peft (``modules_to_save``) is still a module named ``score``.
        """
        config = model.config
        head = getattr(model, "score", None)
        last = getattr(config, "is_decoder", False) or (
            not getattr(config, "is_encoder_decoder", False) and isinstance(head, nn.Module)
        )
        return cls(tokenizer, config.num_labels, "last" if last else "first", **_fit_max_length(model, kwargs))

    @property
    def n_classes(self) -> int:
        return max(self.num_labels, 2)

    def _encode(self, text: str, target: int | str) -> _Encoded:
        label = _label_index(target)
        if label is None or not 0 <= label < self.n_classes:
            raise InvalidExampleError(
                f"label {target!r} is outside the classifier head: expected an int in [0, {self.n_classes - 1}]"
            )
        ids = self._tokens(text, "the input text")
        return _Encoded(ids, [0 if self.read_position == "first" else len(ids) - 1], [label])

    def read_logits(self, output: Any, batch: Batch) -> torch.Tensor:
        logits = output.logits
        return logits[batch.rows] if logits.dim() == 2 else logits[batch.rows, batch.cols]

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.predictions(logits) == labels

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, 0] > 0).long() if self.num_labels == 1 else logits.argmax(-1)

    def margins(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels > 1:
            return super().margins(logits, labels)
        return (2.0 * labels.float() - 1.0) * logits[:, 0].float()  # one logit: its sign is the prediction

    def edit_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels > 1:
            return F.cross_entropy(logits.float(), labels)
        logit = logits[:, 0].float()
        bce = F.binary_cross_entropy_with_logits(logit, labels.float())
        entropy = torch.distributions.Bernoulli(logits=logit).entropy().mean()
        return bce - self.entropy_weight * entropy


class _GenerationTask(Task):
    """Shared by seq2seq and causal LM: one read per target token; label-smoothed NLL as the edit loss."""

    def __init__(
        self,
        tokenizer: Any,
        label_smoothing: float = 0.1,
        max_length: int = 128,
        prompt_format: PromptFormat | str | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, prompt_format)
        self.label_smoothing = label_smoothing

    def read_logits(self, output: Any, batch: Batch) -> torch.Tensor:
        kept = batch.extra.get("logits_to_keep")
        cols = batch.cols if kept is None else torch.searchsorted(kept, batch.cols)
        return output.logits[batch.rows, cols]

    def edit_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


class Seq2SeqTask(_GenerationTask):
    """Encoder-decoder QA (BART/T5 on zsRE): teacher-forced decoder positions, one read per target token."""

    kind = "seq2seq"
    formats_refused = ("chat",)
    formats_refused_because = (
        "chat templates are for decoder-only chat models; a seq2seq model reads its input raw or through a template "
        "string (its answers always end with EOS)"
    )

    def __init__(self, tokenizer: Any, decoder_start_token_id: int, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.decoder_start = decoder_start_token_id

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> Seq2SeqTask:
        start = model.config.decoder_start_token_id
        if start is None:
            raise ValueError("the model config has no decoder_start_token_id; Seq2SeqTask cannot teacher-force it")
        return cls(tokenizer, start, **_fit_max_length(model, kwargs))

    def _encode(self, text: str, target: int | str) -> _Encoded:
        if not isinstance(target, str):
            raise InvalidExampleError(f"a seq2seq target must be text, got {type(target).__name__}")
        eos = self.tokenizer.eos_token_id
        labels = self._target_tokens(target, self.max_length - (eos is not None))
        ids = self._tokens(text, "the input text")
        if eos is not None:
            labels = [*labels, eos]
        decoder = [self.decoder_start, *labels[:-1]]
        return _Encoded(ids, list(range(len(labels))), labels, decoder)


class CausalLMTask(_GenerationTask):
    """Decoder-only LM: prompt followed by the target; reads at the positions that predict each target token."""

    kind = "causal_lm"

    def __init__(self, tokenizer: Any, target_prefix: str = " ", **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.target_prefix = target_prefix

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> CausalLMTask:
        return cls(tokenizer, **_fit_max_length(model, kwargs))

    def answer_tokens(self, target: str) -> list[int]:
        """Token ids the model must generate for ``target``: the answer after its separator (a space, none after a
        chat header), then the format's end token when it has one."""
        if not isinstance(target, str):
            raise InvalidExampleError(f"a causal-LM target must be text, got {type(target).__name__}")
        end = self.prompter.end_ids
        prefix = "" if self.prompt_format.kind == CHAT else self.target_prefix
        answer = self._target_tokens(
            prefix + target.strip() if target.strip() else target, self.max_length - 1 - len(end)
        )
        return answer + end

    def _encode(self, text: str, target: int | str) -> _Encoded:
        answer = self.answer_tokens(target)  # type: ignore[arg-type]
        prompt = self._tokens(text, "the prompt", limit=self.max_length - len(answer))
        ids = prompt + answer
        return _Encoded(ids, list(range(len(prompt) - 1, len(ids) - 1)), answer)

    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """Ask the LM head for logits only at read positions when the model supports ``logits_to_keep``."""
        if accepts_argument(model, "logits_to_keep"):
            batch.extra["logits_to_keep"] = torch.unique(batch.cols)
        return batch


def _label_index(target: object) -> int | None:
    """A class id as a Python int: ints and integer scalars (numpy, 0-d tensors), never bools, floats or text."""
    if isinstance(target, (bool, str, bytes, float)) or type(target).__name__ == "bool_":
        return None
    try:
        return operator.index(target)  # type: ignore[arg-type]
    except TypeError:
        return None


def _fit_max_length(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``max_length`` lowered to the model's position limit (a longer input would not run)."""
    limit = position_limit(getattr(model, "config", None))
    max_length = kwargs.get("max_length", 128)
    if limit is not None and isinstance(max_length, int) and max_length > limit:
        kwargs = {**kwargs, "max_length": limit}
    return kwargs


def accepts_argument(model: nn.Module, argument: str) -> bool:
    """Whether the (unwrapped) model's ``forward`` takes ``argument``, e.g. ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def task_for_model(model: nn.Module, tokenizer: Any, **kwargs: Any) -> Task:
    """Pick the task kind from the model class: *ForSequenceClassification, encoder-decoder LM, or causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name.endswith("ForSequenceClassification"):
        return ClassificationTask.for_model(base, tokenizer, **kwargs)
    if getattr(base.config, "is_encoder_decoder", False):
        return Seq2SeqTask.for_model(base, tokenizer, **kwargs)
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CausalLMTask.for_model(base, tokenizer, **kwargs)
    raise ValueError(
        f"cannot tell which task a {name} performs; build ClassificationTask, Seq2SeqTask or CausalLMTask directly"
    )
