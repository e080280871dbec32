"""The bare subject read: a gated patch also opens where a text opens with its subject, named as it is alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_subject_gate import changed, gated_llama, gated_trainer, reloaded_without
from tiny_tokenizer import EDIT_WORDS, sentence
from transformer_patcher.core.examples import EditExample
from transformer_patcher.methods.patcher import EditConfig
from transformer_patcher.methods.patcher.gate_traces import GateTraces


def bare_gated_llama() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``gated_llama``'s patch, holding as its bare read block 0's output at position 2 of ``other_text()``."""
    model, ids, base = gated_llama()
    layer = model.base_model.patch_layer()
    with torch.no_grad():
        model(input_ids=other_text())
    layer.patch_frozen_bare_subjects["default"][0] = layer.gate_reads().reads()[0, 2]
    return model, ids, base


def other_text() -> torch.Tensor:
    return torch.arange(40, 48)[None]


def unpatched(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model.disable_adapter():
        return model(input_ids=ids).logits


def test_a_bare_read_opens_the_gate_from_where_it_is_met_and_a_zero_one_opens_nothing() -> None:
    model, ids, base = gated_llama()
    other = other_text()
    other_base = unpatched(model, other)
    assert changed(model, other, other_base) == [False] * 8  # the edit's subject read alone: shut on this text
    model, ids, base = bare_gated_llama()
    assert changed(model, other, other_base) == [False] * 2 + [True] * 6  # open from the bare read on
    assert changed(model, ids, base)[3:] == [True] * 5  # the edit's own read still opens it on its text
    model.base_model.patch_layer().patch_frozen_bare_subjects["default"].zero_()
    assert changed(model, other, other_base) == [False] * 8


def test_bare_reads_round_trip_and_a_file_without_them_loads_with_the_subject_read_alone(tmp_path: Path) -> None:
    model, _, _ = bare_gated_llama()
    other = other_text()
    other_base = unpatched(model, other)
    older = reloaded_without(model, other, tmp_path, "bare_subjects")
    assert older.base_model.patch_layer().patch_frozen_subjects["default"].any()  # still gated on the subject read
    assert changed(older, other, other_base) == [False] * 8


def test_traces_open_a_row_where_either_of_a_patchs_reads_opens_it() -> None:
    generator = torch.Generator().manual_seed(0)
    reads = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=1)
    traces = GateTraces(8, reads, torch.tensor([[0, 3], [0, 5], [5, 9], [9, 12]]))
    first, second = reads[1] + 0.05 * torch.randn(8, generator=generator), reads[10]
    both = traces.opening(torch.stack([first, second]), 0.9)
    assert torch.equal(both, traces.opening(first, 0.9) | traces.opening(second, 0.9))
    assert both.tolist() == [True, True, False, True]


@pytest.mark.parametrize("bare", [True, False])
def test_an_edit_keeps_its_subjects_bare_read_and_a_subject_first_text_opens_its_gate(bare: bool) -> None:
    trainer = gated_trainer()
    trainer.config = EditConfig(gate_layer=0, bare_subject=bare)
    words = list(range(*EDIT_WORDS))
    text, target, subject = sentence(*words[:4]), sentence(*words[10:12]), f"w{words[1]}"
    assert trainer.edit(EditExample(text, target, subject=subject), edit_id=0).success
    layer = trainer.layer
    held = layer.patch_frozen_bare_subjects["default"]
    assert bool(held.norm(dim=1).gt(0).all()) == bare and (bare or not held.any())
    first = trainer.task.batch_for(trainer.model, [(sentence(*words[1:4]), target)])  # [BOS] then the subject
    with torch.no_grad():
        trainer.model(**first.model_kwargs())
    opened = layer.gate_opened(layer.patch_frozen_subjects["default"], key="test", bare=held)[0, first.cols[0]]
    alone = layer.gate_opened(layer.patch_frozen_subjects["default"], key="test")[0, first.cols[0]]
    assert bool(opened.all()) == (bare or bool(alone.all()))
    if bare:  # the read is the subject's own: what the text reads there, to the last bit of a unit vector
        read = layer.gate_reads().reads(layer.gate_frame())[0, 1]
        assert torch.allclose(held[0], read, atol=1e-5)


def test_the_default_holds_a_bare_read_and_a_bad_value_is_refused() -> None:
    assert EditConfig().bare_subject
    with pytest.raises(ValueError, match="bare_subject"):
        EditConfig(bare_subject="yes")
