"""Every later batch drives the facts earlier batches wrote back to where their write left them (``replay_written``)."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests, _texts
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet import EditRequest, PMETEditor, PMETHyperParams
from transformer_patcher.methods.pmet.algorithm import read_z, z_read_module
from transformer_patcher.methods.pmet.written_facts import WrittenFacts


def _facts(n: int, offset: int = 0) -> list[EditRequest]:
    return [EditRequest(f"About {{}}, number {i + offset}", f"subject {i + offset}", "yes") for i in range(n)]


def test_pending_facts_join_only_once_committed_and_survive_a_save() -> None:
    facts = WrittenFacts()
    first, values = _facts(2), torch.arange(6.0).reshape(3, 2)
    facts.hold(first, values)
    assert len(facts) == 0 and facts.joined(_facts(1, 5), values[:, :1])[1].shape == (3, 1)
    facts.discard()
    facts.commit()
    assert len(facts) == 0
    facts.hold(first, values)
    facts.commit()
    facts.hold(_facts(1, 2), values[:, :1] + 10)
    facts.commit()
    requests, joined = facts.joined(_facts(1, 7), torch.zeros(3, 1, dtype=torch.float64))
    assert [r.subject for r in requests] == ["subject 0", "subject 1", "subject 2", "subject 7"]
    torch.testing.assert_close(joined, torch.cat([values, values[:, :1] + 10, torch.zeros(3, 1)], 1).double())
    saved = facts.state_tensors()
    facts.reset()
    assert len(facts) == 0 and facts.state_tensors() == {}
    facts.load_state_tensors(saved)
    assert facts.requests == [*first, *_facts(1, 2)]
    torch.testing.assert_close(facts.values, joined[:, :3])


def test_a_replacing_hold_becomes_the_whole_record_once_committed() -> None:
    facts = WrittenFacts()
    facts.hold(_facts(2), torch.zeros(3, 2))
    facts.commit()
    facts.hold(_facts(3), torch.ones(3, 3), replacing=True)
    facts.discard()
    assert len(facts) == 2 and torch.equal(facts.values, torch.zeros(3, 2, dtype=torch.float64))
    facts.hold(_facts(3), torch.ones(3, 3), replacing=True)
    facts.commit()
    assert facts.requests == _facts(3) and torch.equal(facts.values, torch.ones(3, 3, dtype=torch.float64))


def test_a_checkpoint_whose_values_do_not_match_its_facts_is_refused() -> None:
    facts = WrittenFacts()
    facts.hold(_facts(2), torch.zeros(3, 2))
    facts.commit()
    saved = facts.state_tensors()
    saved["written_facts.values"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="3 written values for 2 written facts"):
        facts.load_state_tensors(saved)
    with pytest.raises(ValueError, match="2 values for 1 requests"):
        facts.hold(_facts(1), torch.zeros(3, 2))


@pytest.mark.parametrize("other", ["keep_written", "null_space"])
def test_replaying_written_facts_and_counting_their_keys_again_is_refused(other: str) -> None:
    with pytest.raises(ValueError, match="counted a second time"):
        PMETHyperParams(replay_written=True, **{other: True})
    with pytest.raises(ValueError, match="replay_written must be True or False"):
        PMETHyperParams(replay_written="yes")


def _two_batches(hparams: PMETHyperParams) -> tuple[PMETEditor, torch.Tensor, torch.Tensor]:
    """Edit two batches of two; return the editor and the first batch's z reads right after it and at the end."""
    editor = PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts())
    first = _requests(2)
    editor.edit_batch(first)
    module = z_read_module(editor.model, hparams)
    after_first = read_z(editor.model, editor.tokenizer, first, module)
    editor.edit_batch(_requests(2, offset=20))
    return editor, after_first, read_z(editor.model, editor.tokenizer, first, module)


def test_with_one_edited_layer_replaying_is_counting_the_written_keys() -> None:
    """One layer's write does not move its own keys, so the first batch's facts stand exactly where they were written
    (residual 0) and the replayed solve ``[0, R₂] [K₁, K₂]ᵀ (K Kᵀ + λC)⁻¹`` is ``keep_written``'s."""
    one = HPARAMS.with_options(variant="memit", layers=(1,))
    replayed, _, replayed_end = _two_batches(one.with_options(replay_written=True))
    _, _, counted_end = _two_batches(one.with_options(keep_written=True))
    torch.testing.assert_close(replayed_end, counted_end, atol=1e-4, rtol=1e-4)
    assert len(replayed.replay) == 4 and replayed.written is None


def test_replaying_pulls_the_first_batch_back_where_lower_layers_moved_its_keys() -> None:
    """With two edited layers the second batch's lower write moves the first batch's keys at the upper one; the replay
    reads them there and drives those facts back, so they end nearer where their write left them than when the
    written keys are counted as they were written, or not at all."""
    hparams = HPARAMS.with_options(variant="memit")
    drift = {}
    for name, options in {"replay": {"replay_written": True}, "keys": {"keep_written": True}, "none": {}}.items():
        _, after_first, end = _two_batches(hparams.with_options(**options))
        drift[name] = (end - after_first).norm()
    assert drift["replay"] < 0.1 * drift["keys"]
    assert drift["replay"] < 0.1 * drift["none"]


def test_a_resumed_editor_replays_the_same_facts() -> None:
    hparams = HPARAMS.with_options(variant="memit", replay_written=True)
    editor, _, _ = _two_batches(hparams)
    saved = editor.state_tensors()
    other = PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts())
    other.load_state_tensors(saved)
    assert other.replay.requests == editor.replay.requests
    torch.testing.assert_close(other.replay.values, editor.replay.values)
    other.reset()
    assert len(other.replay) == 0
