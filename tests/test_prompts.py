"""Prompt formats: raw, chat (the tokenizer's template, answers ending their turn) and template strings, on a tiny
tokenizer with a chat template and one without."""

from __future__ import annotations

import pytest

from test_suite import chat_tokenizer
from tiny_tokenizer import sharp_gpt2, tiny_tokenizer
from transformer_patcher import get_patcher_model
from transformer_patcher.core.errors import PromptFormatError
from transformer_patcher.core.prompts import Prompter, PromptFormat
from transformer_patcher.core.tasks import CausalLMTask, ClassificationTask, Seq2SeqTask
from transformer_patcher.experiments.evaluation import greedy_continuations


def test_chat_renders_the_template_and_ends_the_answer_with_the_end_of_turn_token() -> None:
    task = CausalLMTask(chat_tokenizer(), prompt_format="chat")
    assert task.prompter.render("w70 w71") == "w4 w70 w71 w5 w6 "
    assert task.prompter.end_ids == [5]  # w5 closes every turn
    assert task.prompter.stop_ids == [5, 2]  # end of turn, then EOS
    batch = task.collate([("w70 w71", "w80 w81")])
    assert batch.inputs["input_ids"][0].tolist() == [4, 70, 71, 5, 6, 80, 81, 5]  # no BOS: the template writes one
    assert batch.labels.tolist() == [80, 81, 5]  # no separator after the header, then the end-of-turn token
    assert batch.cols.tolist() == [4, 5, 6]


def test_raw_answers_end_with_eos_only_on_request() -> None:
    tokenizer = tiny_tokenizer()
    plain = CausalLMTask(tokenizer).collate([("w70 w71", "w80")])
    ended = CausalLMTask(tokenizer, prompt_format=PromptFormat("raw", append_eos=True)).collate([("w70 w71", "w80")])
    assert plain.labels.tolist() == [80]
    assert ended.labels.tolist() == [80, 2]
    assert ended.inputs["input_ids"][0].tolist() == [1, 70, 71, 80, 2]  # BOS from the tokenizer, as for raw text


def test_a_template_string_puts_the_text_in_its_slot() -> None:
    task = CausalLMTask(tiny_tokenizer(), prompt_format="w9 {text} w10")
    assert task.prompter.render("w70") == "w9 w70 w10"
    assert task.collate([("w70", "w80")]).inputs["input_ids"][0].tolist() == [1, 9, 70, 10, 80]
    assert PromptFormat("{{w9}} {text}").kind == "template"


@pytest.mark.parametrize(
    ("template", "message"),
    [("no slot here", "exactly one"), ("{text} {text}", "exactly one"), ("{text} {other}", "not usable"), (" ", "raw")],
)
def test_malformed_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(PromptFormatError, match=message):
        PromptFormat(template)


def test_chat_without_a_chat_template_is_a_clear_error() -> None:
    with pytest.raises(PromptFormatError, match=r"needs a chat template.*has none"):
        CausalLMTask(tiny_tokenizer(), prompt_format="chat")
    with pytest.raises(PromptFormatError, match="needs a chat template"):
        CausalLMTask(tiny_tokenizer()).formatted("chat")


def test_formats_a_task_kind_cannot_use_are_refused() -> None:
    with pytest.raises(PromptFormatError, match="classifier"):
        ClassificationTask(tiny_tokenizer(), 2, prompt_format="chat")
    with pytest.raises(PromptFormatError, match="classifier"):
        ClassificationTask(tiny_tokenizer(), 2, prompt_format=PromptFormat("raw", append_eos=True))
    with pytest.raises(PromptFormatError, match="seq2seq"):
        Seq2SeqTask(chat_tokenizer(), 0, prompt_format="chat")
    assert ClassificationTask(tiny_tokenizer(), 2, prompt_format="w9 {text}").collate([("w70", 1)]).size == 1


def test_the_format_is_part_of_the_task_signature() -> None:
    raw, chat = CausalLMTask(chat_tokenizer()), CausalLMTask(chat_tokenizer(), prompt_format="chat")
    eos = raw.formatted(PromptFormat("raw", append_eos=True))
    assert len({raw.signature, chat.signature, eos.signature}) == 3
    assert raw.prompt_format.name == "raw" and eos.prompt_format.name == "raw+eos" and chat.formatted(None) is not chat


def test_coerce_reads_what_configs_and_logs_carry() -> None:
    assert PromptFormat.coerce(None) == PromptFormat()
    assert PromptFormat.coerce({"template": "chat", "append_eos": False}) == PromptFormat("chat")
    assert PromptFormat.coerce(PromptFormat("chat").to_dict()) == PromptFormat("chat")
    with pytest.raises(PromptFormatError):
        PromptFormat.coerce({"template": "chat", "other": 1})


def test_a_trained_chat_edit_is_generated_and_then_stops() -> None:
    """Success as a user sees it: after a chat edit, generate() writes the answer and stops at the end of turn."""
    from transformer_patcher.methods.patcher import EditConfig, EditExample, PatchTrainer

    model = get_patcher_model(sharp_gpt2())
    task = CausalLMTask(chat_tokenizer(), prompt_format="chat")
    trainer = PatchTrainer(model, task, EditConfig.quick())
    record = trainer.edit(EditExample("w70 w71 w72", "w90 w91"), edit_id=1)
    assert record.needed and record.success
    prompt = task.prompt_tokens("w70 w71 w72")
    (generated,) = greedy_continuations(model, [prompt], task.prompter.stop_ids, 10, task.pad_id)
    assert generated == [90, 91, 5]


def test_prompter_end_of_turn_needs_a_marker_after_the_answer() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(PromptFormatError, match="no end-of-turn marker"):
        Prompter(tokenizer, PromptFormat("chat"))
