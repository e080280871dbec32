"""Prompt formats: how an input's text becomes what the model reads, and which token ends the answer.

A deployed chat model is asked through its chat template, so an edit made on the raw question fixes a prompt nobody
sends, and a fix that does not end its answer runs on ("Dieter Reiter Dienst when Dieter Reiter"). A format says both:

- ``raw``: the text as given; the answer follows after a space. ``append_eos`` ends the answer with the tokenizer's
  EOS token, so the edit also teaches the model to stop.
- ``chat``: the tokenizer's chat template renders one user turn with the generation prompt (what ``generate`` sees
  in deployment); the answer is the assistant's turn and always ends with the template's end-of-turn token.
- a template string with one ``{text}`` slot, e.g. ``"Question: {text}\\nAnswer:"``: the text is put in the slot, the
  answer follows after a space; ``append_eos`` as for raw. Other braces are written doubled (``{{``), as in
  ``str.format``.

:class:`PromptFormat` is the tokenizer-free description (what configs, edit logs and the command line carry);
:class:`Prompter` binds it to a tokenizer and answers the questions a task asks: the rendered prompt, whether the
tokenizer should add its own special tokens, which token ends an answer, and where generation stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformer_patcher.core.errors import PromptFormatError

RAW = "raw"
CHAT = "chat"
SLOT = "{text}"
_ANSWER_SENTINEL = "\u2063ANSWER\u2063"  # invisible separators: no real answer contains this


@dataclass(frozen=True)
class PromptFormat:
    """``template`` is ``"raw"``, ``"chat"`` or a string with one ``{text}`` slot; ``append_eos`` ends raw and
    template answers with EOS (chat answers always end with the end-of-turn token)."""

    template: str = RAW
    append_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template.strip():
            raise PromptFormatError(
                f"a prompt format is 'raw', 'chat' or a template with {SLOT}; got {self.template!r}"
            )
        if not isinstance(self.append_eos, bool):
            raise PromptFormatError(f"append_eos must be true or false, got {self.append_eos!r}")
        if self.kind == "template":
            try:
                rendered = self.template.format(text="\x00")
            except (IndexError, KeyError, ValueError) as error:
                raise PromptFormatError(
                    f"the prompt template {self.template!r} is not usable ({type(error).__name__}: {error}); it needs "
                    f"exactly one {SLOT} slot, with any other brace doubled ('{{{{' or '}}}}')"
                ) from error
            if rendered.count("\x00") != 1:
                raise PromptFormatError(f"the prompt template {self.template!r} needs exactly one {SLOT} slot")

    @property
    def kind(self) -> str:
        """``raw``, ``chat`` or ``template``."""
        return self.template if self.template in (RAW, CHAT) else "template"

    @property
    def ends_answer(self) -> bool:
        """Whether answers end with a stop token (and an edit teaches the model to stop)."""
        return self.kind == CHAT or self.append_eos

    @property
    def name(self) -> str:
        """A short label for tables: ``raw``, ``raw+eos``, ``chat``, ``template`` or ``template+eos``."""
        return self.kind + ("+eos" if self.append_eos and self.kind != CHAT else "")

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "append_eos": self.append_eos}

    @classmethod
    def coerce(cls, value: PromptFormat | str | dict[str, Any] | None, append_eos: bool = False) -> PromptFormat:
        """A format from what a caller gives: a format, a spec string, a ``to_dict`` dict, or None (raw)."""
        if isinstance(value, PromptFormat):
            return value
        if value is None:
            return cls(RAW, append_eos)
        if isinstance(value, str):
            return cls(value, append_eos)
        if isinstance(value, dict) and set(value) <= {"template", "append_eos"}:
            return cls(value.get("template", RAW), value.get("append_eos", False))
        raise PromptFormatError(f"cannot read a prompt format from {value!r}")


class Prompter:
    """A :class:`PromptFormat` bound to a tokenizer. Asking for ``chat`` on a tokenizer without a chat template, or
    for EOS on one without an EOS token, is refused here, before any example is encoded."""

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat) -> None:
        self.tokenizer = tokenizer
        self.format = prompt_format
        self.end_ids: list[int] = []
        if prompt_format.kind == CHAT:
            if not getattr(tokenizer, "chat_template", None):
                raise PromptFormatError(
                    f"prompt_format 'chat' needs a chat template, and this tokenizer ({type(tokenizer).__name__}, "
                    f"{getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has none; use 'raw' or a template "
                    f"string such as 'Question: {SLOT}\\nAnswer:'"
                )
            self.end_ids = [self._end_of_turn()]
        elif prompt_format.append_eos:
            if tokenizer.eos_token_id is None:
                raise PromptFormatError("append_eos needs an EOS token, and this tokenizer has none")
            self.end_ids = [int(tokenizer.eos_token_id)]

    @property
    def add_special_tokens(self) -> bool:
        """A chat template writes its own BOS and markers; the tokenizer must not add them again."""
        return self.format.kind != CHAT

    @property
    def stop_ids(self) -> list[int]:
        """Token ids at which greedy generation stops: the format's end token and the tokenizer's EOS."""
        ids = list(self.end_ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(int(self.tokenizer.eos_token_id))
        return ids

    def render(self, text: str) -> str:
        """The prompt the model reads for input ``text`` (raw text is returned unchanged)."""
        kind = self.format.kind
        if kind == RAW:
            return text
        if kind == "template":
            return self.format.template.format(text=text)
        return self._chat([{"role": "user", "content": text}], add_generation_prompt=True)

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as error:  # jinja raises its own types for templates that reject a conversation
            raise PromptFormatError(f"the tokenizer's chat template failed to render: {error}") from error

    def _end_of_turn(self) -> int:
        """The first token the template writes after an assistant answer (``<|im_end|>``, ``<end_of_turn>``...)."""
        rendered = self._chat(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER_SENTINEL}],
            add_generation_prompt=False,
        )
        _, found, after = rendered.partition(_ANSWER_SENTINEL)
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if found else []
        if not ids:
            raise PromptFormatError(
                "the tokenizer's chat template writes no end-of-turn marker after the assistant's answer, so an edited "
                "answer could not teach the model to stop; use 'raw' with append_eos instead"
            )
        return int(ids[0])
