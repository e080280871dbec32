"""Every batch writes all facts so far again from the unedited weights (``rewrite_written``)."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests, _texts
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.core.errors import InvalidPatchError
from transformer_patcher.methods.pmet import PMETEditor, PMETHyperParams, algorithm
from transformer_patcher.methods.pmet.algorithm import read_z, written_values, z_read_module

REWRITE = HPARAMS.with_options(rewrite_written=True, keep_prompts=0.1)


def _editor(hparams: PMETHyperParams) -> PMETEditor:
    return PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts(), progress=False)


def _weights(editor: PMETEditor) -> dict[str, torch.Tensor]:
    return {name: layer.get_delta_weight(editor.adapter_name) for name, layer in editor.delta_layers().items()}


@pytest.mark.parametrize("spread", ["memit", "joint"])
def test_two_rewritten_batches_are_one_batch_of_both(spread: str) -> None:
    """The second batch's write covers the first batch's facts too, from the unedited weights, and replaces the
    factors: the model ends where one batch of all four facts puts it, and the adapter holds one rank per fact."""
    hparams = REWRITE.with_options(spread=spread)
    facts = [*_requests(2), *_requests(2, offset=20)]
    together = _editor(hparams.with_options(rewrite_written=False))
    targets = together.compute_targets(facts)
    together.edit_batch(facts, targets)
    rewritten = _editor(hparams)
    rewritten.edit_batch(facts[:2], targets.select([0, 1]))
    first = _weights(rewritten)
    rewritten.edit_batch(facts[2:], targets.select([2, 3]))
    assert len(rewritten.replay) == 4
    assert all(layer.rank(rewritten.adapter_name) == 4 for layer in rewritten.delta_layers().values())
    expected, got = _weights(together), _weights(rewritten)
    for name, weight in expected.items():
        assert (got[name] - first[name]).norm() > 0.01 * weight.norm()  # the second write changed every layer
        torch.testing.assert_close(got[name], weight, atol=1e-5 * float(weight.abs().max()), rtol=1e-4)


def test_targets_are_optimised_against_the_unedited_model() -> None:
    edited = _editor(REWRITE)
    edited.edit_batch(_requests(2))
    later = _requests(2, offset=20)
    torch.testing.assert_close(edited.compute_targets(later).values, _editor(REWRITE).compute_targets(later).values)


def test_a_failed_rewrite_leaves_the_factors_and_the_facts_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    editor = _editor(REWRITE)
    editor.edit_batch(_requests(2))
    before = editor.state_tensors()
    last = list(editor.delta_layers().values())[-1]
    replace, calls = last.replace_delta, []

    def refuse_once(*args: object) -> int:  # the new factors are refused; putting the old ones back works
        calls.append(args)
        if len(calls) == 1:
            raise InvalidPatchError("disk full")
        return replace(*args)

    monkeypatch.setattr(last, "replace_delta", refuse_once)
    with pytest.raises(InvalidPatchError, match="disk full"):
        editor.edit_batch(_requests(2, offset=20))  # the first layers were already replaced when the last refused
    monkeypatch.undo()
    after = editor.state_tensors()
    assert "rewritten_facts.values" in before and "written_facts.values" not in before
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert len(editor.replay) == 2


def test_a_resumed_editor_rewrites_the_same_facts() -> None:
    editor = _editor(REWRITE)
    editor.edit_batch(_requests(2))
    other = _editor(REWRITE)
    other.load_state_tensors(editor.state_tensors())
    assert other.replay.requests == editor.replay.requests
    torch.testing.assert_close(other.replay.values, editor.replay.values)


@pytest.mark.parametrize("other", ["replay_written", "keep_written", "null_space"])
def test_rewriting_beside_another_way_to_keep_earlier_batches_is_refused(other: str) -> None:
    with pytest.raises(ValueError, match="rewrite_written writes every fact again"):
        PMETHyperParams(rewrite_written=True, **{other: True})
    with pytest.raises(ValueError, match="rewrite_written must be True or False"):
        PMETHyperParams(rewrite_written=1)


def test_a_rewritten_stream_keeps_aiming_a_resolved_fact_where_its_resolve_round_aimed_it() -> None:
    """A resolve round aims the facts the first write missed further; the record holds those aims, so every later
    batch's rewrite drives them there again, not back to where the first solve aimed them."""
    hparams = REWRITE.with_options(mom2_update_weight=1e-4, refine_rounds=1, refine="resolve")
    editor = _editor(hparams)
    requests = _requests(6)
    targets = editor.compute_targets(requests)
    first = written_values(editor.model, editor.tokenizer, requests, hparams, targets)[1].cpu()
    editor.edit_batch(requests, targets)
    moved = (editor.replay.values - first).norm(dim=0) > 1e-6 * first.norm(dim=0)
    assert 0 < int(moved.sum()) < len(requests)  # the missed facts only (the resolve test: some miss on this model)


def test_a_resolve_round_of_a_rewritten_stream_checks_and_aims_again_every_fact_so_far(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``refine_written`` the second batch's resolve round checks the first batch's facts too, and aims further
    exactly the earlier facts its write missed; the record keeps the others' aims. Two earlier facts are aimed back
    where the unedited model has them, so the rewrite misses them."""
    hparams = REWRITE.with_options(refine_rounds=1, refine="resolve", refine_written=True)
    editor = _editor(hparams)
    first = _requests(6)
    editor.edit_batch(first)
    with editor.model.disable_adapter():
        unedited = read_z(editor.model, editor.tokenizer, first[:2], z_read_module(editor.model, hparams))
    editor.replay.values[:, :2] = unedited.to(editor.replay.values)
    earlier = editor.replay.values.clone()
    checked: list[list[bool]] = []
    score = algorithm.score_pairs

    def spy(*args: object, **kwargs: object) -> list:
        outcomes = score(*args, **kwargs)
        checked.append([not outcome.correct for outcome in outcomes])
        return outcomes

    monkeypatch.setattr(algorithm, "score_pairs", spy)
    editor.edit_batch(_requests(6, offset=6))
    (missed,) = checked
    assert len(missed) == 12 and len(editor.replay) == 12
    assert missed[:2] == [True, True]
    moved = (editor.replay.values[:, :6] - earlier).norm(dim=0) > 1e-6 * earlier.norm(dim=0)
    assert moved.tolist() == missed[:6]


def test_checking_every_written_fact_needs_a_rewritten_resolve() -> None:
    resolve = {"refine_rounds": 1, "refine": "resolve"}
    for options in ({"rewrite_written": True}, {**resolve}, {"rewrite_written": True, "refine_rounds": 1}):
        with pytest.raises(ValueError, match="refine_written checks every fact written so far"):
            PMETHyperParams(refine_written=True, **options)
    PMETHyperParams(refine_written=True, rewrite_written=True, **resolve)
