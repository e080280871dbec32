"""Each solve keeps the keys at the other tokens of the facts' own prompts (``keep_prompts``)."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests, _texts
from tiny_tokenizer import EDIT_WORDS, tiny_tokenizer
from transformer_patcher.methods.pmet import EditRequest, PMETEditor, PMETHyperParams
from transformer_patcher.methods.pmet.algorithm import (
    compute_layer_keys,
    layer_reads,
    prompt_moment,
    read_module_values,
    read_with_moments,
    read_z,
)
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.requests import encode, encode_request
from transformer_patcher.methods.pmet.templates import BARE_PROMPT


def test_the_other_tokens_are_every_real_token_but_the_subjects_last_whatever_the_batching() -> None:
    model, tokenizer = _model("llama"), tiny_tokenizer()
    requests = _requests(3)
    prefix = requests[1].template.split("{}")[0]
    requests[1] = EditRequest(prefix * 2 + "{}", requests[1].subject, requests[1].target)  # a longer prompt
    bare = [encode(tokenizer, r.template, r.subject) for r in requests]
    assert len({len(e.ids) for e in bare}) > 1  # padding is in play
    module = block_modules(model, 1).ffn_out
    together = read_module_values(model, tokenizer, bare, module, "input", at_subject=False)
    alone = torch.cat(
        [read_module_values(model, tokenizer, [e], module, "input", at_subject=False, batch_size=1) for e in bare]
    )
    assert together.shape[0] == sum(len(e.ids) - 1 for e in bare)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    subject = read_module_values(model, tokenizer, bare, module, "input")
    assert subject.shape[0] == len(bare)
    moment = prompt_moment(model, tokenizer, requests, module)
    torch.testing.assert_close(moment, together.double().T @ together.double(), rtol=1e-5, atol=1e-5)  # float32 chunks


def _ffn_outputs(
    editor: PMETEditor, requests, at_subject: bool, answers: bool = False, layers: tuple[int, ...] = HPARAMS.layers
) -> torch.Tensor:
    bare = [encode_request(editor.tokenizer, r, answers) for r in requests]
    return torch.cat(
        [
            read_module_values(
                editor.model,
                editor.tokenizer,
                bare,
                block_modules(editor.model, layer).ffn_out,
                "output",
                at_subject=at_subject,
            )
            for layer in layers
        ]
    )


def _moved(keep: float, **options: object) -> tuple[float, float]:
    """How far one batch's write moves the edited FFNs' outputs at its prompts' other tokens, and at the subject."""
    hparams = HPARAMS.with_options(keep_prompts=keep, **options)
    editor = PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts())
    requests = _requests(3)
    others, subjects = _ffn_outputs(editor, requests, False), _ffn_outputs(editor, requests, True)
    editor.edit_batch(requests)
    return (
        float((_ffn_outputs(editor, requests, False) - others).norm()),
        float((_ffn_outputs(editor, requests, True) - subjects).norm()),
    )


def test_keeping_the_prompts_holds_their_other_tokens_and_still_writes_at_the_subject() -> None:
    free_others, free_subject = _moved(0.0)
    kept_others, kept_subject = _moved(100.0)
    assert free_others > 0.05 * free_subject  # without it, the write moves the other tokens too
    assert kept_others < 0.1 * free_others
    assert kept_subject > 0.5 * free_subject


def test_keeping_only_the_written_prompts_leaves_a_first_batch_free() -> None:
    """With ``keep_prompts_of="written"`` only the replayed facts' prompts are kept: a first batch has none, so its
    write moves its own prompts' other tokens as freely as without the option."""
    free = _moved(0.0, replay_written=True)
    written_only = _moved(100.0, replay_written=True, keep_prompts_of="written")
    assert written_only == pytest.approx(free, rel=1e-6)


def _two_token_answers() -> list[EditRequest]:
    return [
        EditRequest(r.template, r.subject, f"{r.target} w{EDIT_WORDS[0] + 20 + i}") for i, r in enumerate(_requests(3))
    ]


def _moved_at_answers(keep_answers: bool) -> float:
    """How far one batch's write (its prompts kept with a large weight) moves the first edited FFN's output at the
    other tokens of its prompts followed by their two-token answers (teacher forcing). Only the first: a later layer's
    keys at the answer move with the write at the subject before it, as they should."""
    hparams = HPARAMS.with_options(keep_prompts=100.0, keep_answers=keep_answers)
    editor = PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts())
    requests = _two_token_answers()
    first = HPARAMS.layers[:1]
    before = _ffn_outputs(editor, requests, False, answers=True, layers=first)
    editor.edit_batch(requests)
    return float((_ffn_outputs(editor, requests, False, answers=True, layers=first) - before).norm())


def test_keeping_the_answers_holds_the_tokens_a_later_answer_token_is_read_at() -> None:
    tokenizer = tiny_tokenizer()
    request = _two_token_answers()[0]
    bare, taught = encode_request(tokenizer, request), encode_request(tokenizer, request, answer=True)
    assert len(taught.ids) == len(bare.ids) + 1  # the answer's first token joins the kept tokens
    prompts_only, with_answers = _moved_at_answers(False), _moved_at_answers(True)
    assert prompts_only > 0.01
    assert with_answers < 0.01 * prompts_only


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="keep_prompts"):
        PMETHyperParams(keep_prompts=-1.0)
    with pytest.raises(ValueError, match="keep_prompts_of must be one of"):
        PMETHyperParams(keep_prompts_of="mine")
    with pytest.raises(ValueError, match="needs replay_written"):
        PMETHyperParams(keep_prompts=1.0, keep_prompts_of="written")
    with pytest.raises(ValueError, match="keep_answers must be True or False"):
        PMETHyperParams(keep_answers="yes")


def _second_batch_moves_the_first(**options: object) -> float:
    editor = PMETEditor(
        _model("llama"), tiny_tokenizer(), HPARAMS.with_options(replay_written=True, **options), _texts()
    )
    first = _requests(2)
    editor.edit_batch(first)
    before = _ffn_outputs(editor, first, False)
    editor.edit_batch(_requests(2, offset=20))
    return float((_ffn_outputs(editor, first, False) - before).norm())


def test_a_later_batch_keeps_the_written_prompts() -> None:
    free = _second_batch_moves_the_first()
    kept = _second_batch_moves_the_first(keep_prompts=100.0, keep_prompts_of="written")
    assert free > 0.01 and kept < 0.1 * free


def _two_word_subjects() -> list[EditRequest]:
    """Prompts whose subject is two words, the first of which the write would otherwise move too."""
    low = EDIT_WORDS[0]
    return [
        EditRequest(f"w{low + i} {{}} w{low + 10 + i}", f"w{20 + i} w{30 + i}", f"w{low + 40 + i}") for i in range(3)
    ]


def test_the_subject_starts_at_its_first_word() -> None:
    tokenizer = tiny_tokenizer()
    request = _two_word_subjects()[0]
    encoded = encode_request(tokenizer, request)
    assert (encoded.subject_start, encoded.lookup) == (2, 3)  # after the BOS and the first word
    assert encode(tokenizer, "{} w12", "w20 w30").subject_start == 1


def test_keep_subjects_weighs_the_subjects_other_tokens() -> None:
    model, tokenizer = _model("llama"), tiny_tokenizer()
    requests = _two_word_subjects()
    module = block_modules(model, 1).ffn_out
    encodings = [encode_request(tokenizer, r) for r in requests]
    rows = read_module_values(model, tokenizer, encodings, module, "input", at_subject=False).double()
    first_words = rows[2::4]  # each prompt's rows: the BOS, its first word, its subject's first word, its last word
    plain = prompt_moment(model, tokenizer, requests, module)
    weighed = prompt_moment(model, tokenizer, requests, module, subject_weight=4.0)
    torch.testing.assert_close(weighed - plain, 3.0 * first_words.T @ first_words, rtol=1e-4, atol=1e-4)


def _moved_at_subject_starts(keep_subjects: float | None) -> float:
    """How far one batch's write moves the first edited FFN's output at its subjects' first words."""
    hparams = HPARAMS.with_options(keep_prompts=0.01, keep_subjects=keep_subjects)
    editor = PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts())
    requests = _two_word_subjects()
    first = HPARAMS.layers[:1]
    before = _ffn_outputs(editor, requests, False, layers=first)[2::4]
    editor.edit_batch(requests)
    return float((_ffn_outputs(editor, requests, False, layers=first)[2::4] - before).norm())


def test_keeping_the_subjects_holds_their_first_words() -> None:
    free, kept = _moved_at_subject_starts(None), _moved_at_subject_starts(100.0)
    assert free > 0.01
    assert kept < 0.1 * free
    with pytest.raises(ValueError, match="keep_subjects must be >= 0"):
        PMETHyperParams(keep_prompts=1.0, keep_subjects=-1.0)
    with pytest.raises(ValueError, match="set keep_prompts"):
        PMETHyperParams(keep_subjects=1.0)


def _forward_count(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("answers", [False, True])
def test_one_layer_step_reads_keys_values_and_kept_moments_in_one_forward_pass(answers: bool) -> None:
    model, tokenizer = _model("llama"), tiny_tokenizer()
    requests = _requests(3)
    hparams = HPARAMS.with_options(keep_prompts=0.5, keep_subjects=2.0, keep_answers=answers, key_reads="prompt")
    names = [block_modules(model, layer).ffn_out for layer in (0, 1)]
    read = block_modules(model, 1).block
    calls = _forward_count(model)
    keys, current, kept = layer_reads(model, tokenizer, requests, hparams, BARE_PROMPT, names, read, requests)
    assert calls[0] == 1  # one chunk of three prompts: one pass, not one per read
    for key, name in zip(keys, names, strict=True):
        torch.testing.assert_close(key, compute_layer_keys(model, tokenizer, requests, BARE_PROMPT, [name])[0])
    torch.testing.assert_close(current, read_z(model, tokenizer, requests, read))
    for moment, name in zip(kept, names, strict=True):
        alone = prompt_moment(model, tokenizer, requests, name, answers, subject_weight=4.0)
        torch.testing.assert_close(moment, 0.5 * alone)
    others = _requests(2, offset=5)  # the kept prompts are not the driven facts': a pass of their own
    calls[0] = 0
    _, _, kept_others = layer_reads(model, tokenizer, requests, hparams, BARE_PROMPT, names, read, others)
    assert calls[0] == 2
    torch.testing.assert_close(kept_others[0], 0.5 * prompt_moment(model, tokenizer, others, names[0], answers, 4.0))


def test_prompt_moments_summed_chunk_by_chunk_match_the_rows_read_together() -> None:
    model, tokenizer = _model("llama"), tiny_tokenizer()
    requests = _requests(5)
    encodings = [encode_request(tokenizer, r, True) for r in requests]
    module = block_modules(model, 1).ffn_out
    rows = read_module_values(model, tokenizer, encodings, module, "input", False, batch_size=2).double()
    at_subject = read_module_values(model, tokenizer, encodings, module, "input", batch_size=2)
    read, moments = read_with_moments(model, tokenizer, encodings, [(module, "input")], 1, batch_size=2)
    torch.testing.assert_close(moments[0], rows.T @ rows, rtol=1e-5, atol=1e-5)  # each chunk's in float32
    torch.testing.assert_close(read[0], at_subject)
