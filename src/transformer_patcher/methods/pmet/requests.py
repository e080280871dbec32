"""Edit requests ("{subject} ... → target") and the token positions PMET reads and writes.

A request names its subject because PMET stores the new fact at the subject's last token: the keys are read there
and the target vectors are inserted there. The prompt holds the subject literally or as a ``{}`` slot (ROME style);
a prompt without its subject is refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformer_patcher.core.errors import InvalidExampleError

TARGET_PREFIX = " "  # the same separator the causal-LM task puts between prompt and answer


@dataclass(frozen=True)
class EditRequest:
    """Make ``prompt`` (which mentions ``subject``) continue with ``target``."""

    prompt: str
    subject: str
    target: str

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidExampleError(f"the request's {name} must be text, got {type(value).__name__}")
            if not value.strip():
                raise InvalidExampleError(f"the request's {name} is empty; every request needs a non-empty {name}")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise InvalidExampleError(
                f"the subject {self.subject!r} does not occur in the prompt {self.prompt!r}; PMET writes the fact at "
                "the subject's last token, so the prompt must mention it (literally or as a '{}' slot)"
            )
        try:
            text = self.template.format(self.subject)
        except (IndexError, KeyError, ValueError) as error:
            raise InvalidExampleError(
                f"the prompt {self.prompt!r} is not a usable template: it has a '{{}}' slot and other braces "
                f"({type(error).__name__}: {error}); give exactly one '{{}}' and no other '{{' or '}}'"
            ) from error
        if self.subject not in text:
            raise InvalidExampleError(
                f"the subject {self.subject!r} is lost when formatting the prompt {self.prompt!r}"
            )

    @property
    def template(self) -> str:
        """The prompt with its first subject mention as ``{}``."""
        if "{}" in self.prompt:
            return self.prompt
        return escape_braces(self.prompt).replace(escape_braces(self.subject), "{}", 1)

    @property
    def text(self) -> str:
        return self.template.format(self.subject)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EditRequest:
        """From a loader row (``text``/``prompt``, ``subject``, ``target``/``target_new``); every field must be text."""
        values = {
            "prompt": record.get("text", record.get("prompt")),
            "subject": record.get("subject"),
            "target": record.get("target", record.get("target_new")),
        }
        for name, value in values.items():
            if value is None:
                raise InvalidExampleError(f"the record has no {name} (keys: {sorted(record)})")
            if not isinstance(value, str):
                raise InvalidExampleError(f"the record's {name} must be text, got {type(value).__name__} {value!r}")
        return cls(values["prompt"], values["subject"], values["target"])


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt (with optional appended answer) and the read/write positions in it."""

    ids: list[int]
    lookup: int  # the subject's last token
    target_positions: list[int]  # positions whose next-token logits should give the target
    target_ids: list[int]
    subject_start: int = 0  # the subject's first token (the text before it, less a trailing space, tokenised alone)


def target_ids(tokenizer: Any, target: str) -> list[int]:
    ids = tokenizer(TARGET_PREFIX + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidExampleError(f"the target {target!r} encodes to no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise InvalidExampleError(f"the target {target!r} maps to the unknown token; the model could never produce it")
    return list(ids)


def encode(tokenizer: Any, template: str, subject: str, answer: Sequence[int] = ()) -> Encoded:
    """Tokenise ``template.format(subject)`` plus ``answer[:-1]`` (teacher forcing) and locate the subject's end.

    The subject's last token is the last token of the text up to the end of the subject, tokenised on its own (as in
    ROME's ``find_fact_lookup_idx``).
    """
    prefix = template.partition("{}")[0].replace("{{", "{").replace("}}", "}")  # unescaped, as in the text
    text = template.format(subject)
    prompt_ids = list(tokenizer(text)["input_ids"])
    upto = list(tokenizer(prefix + subject)["input_ids"])
    if not prompt_ids or not upto:
        raise InvalidExampleError(f"the prompt {text!r} encodes to no tokens")
    lookup = min(len(upto), len(prompt_ids)) - 1
    head = prefix.rstrip()  # a prefix's trailing space is the subject's first token's (and "" may encode to a BOS)
    start = min(len(tokenizer(head)["input_ids"]), lookup)
    answer = list(answer)
    ids = prompt_ids + answer[:-1]
    positions = list(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer)))
    return Encoded(ids, lookup, positions, answer, start)


def encode_request(tokenizer: Any, request: EditRequest, answer: bool = False) -> Encoded:
    """:func:`encode` of ``request``'s prompt, followed with ``answer`` by its target's tokens but the last (teacher
    forcing)."""
    answer_ids = target_ids(tokenizer, request.target) if answer else ()
    return encode(tokenizer, request.template, request.subject, answer_ids)


def escape_braces(text: str) -> str:
    """``text`` as a literal inside a ``str.format`` template."""
    return text.replace("{", "{{").replace("}", "}}")
