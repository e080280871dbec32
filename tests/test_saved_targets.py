"""Mass-editor targets saved piece by piece: an interrupted optimisation resumes at the first piece not saved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from transformer_patcher.experiments.sme.saved_targets import read_saved_targets, saved_targets
from transformer_patcher.methods.pmet import Targets


def _targets(index: Sequence[int], attention: bool = True) -> Targets:
    """Row i holds i everywhere, so a piece in the wrong place shows."""
    rows = torch.tensor([[float(i)] * 3 for i in index])
    return Targets(rows + 0.5, rows, [i + 1 for i in index], [i / 100 for i in index], rows * 2 if attention else None)


class Stop(Exception):
    pass


def test_pieces_are_saved_as_they_finish_and_a_resumed_call_computes_only_the_rest(tmp_path: Path) -> None:
    asked: list[list[int]] = []

    def failing_at_the_third(index: Sequence[int]) -> Targets:
        asked.append(list(index))
        if len(asked) == 3:
            raise Stop
        return _targets(index)

    with pytest.raises(Stop):
        saved_targets(tmp_path, "pmet", 10, failing_at_the_third, piece=4)
    assert asked == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert read_saved_targets(tmp_path, "pmet") is None  # only the partial file is there
    asked.clear()

    def counting(index: Sequence[int]) -> Targets:
        asked.append(list(index))
        return _targets(index)

    targets, seconds = saved_targets(tmp_path, "pmet", 10, counting, piece=4)
    assert asked == [[8, 9]]
    expected = _targets(range(10))
    for got, want in ((targets.values, expected.values), (targets.init, expected.init)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(targets.attention, expected.attention)
    assert targets.steps == expected.steps and targets.probabilities == expected.probabilities and seconds >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["targets-pmet.json", "targets-pmet.safetensors"]
    asked.clear()
    again, _ = saved_targets(tmp_path, "pmet", 10, counting, piece=4)
    assert asked == [] and again.steps == expected.steps  # read, not computed
    with pytest.raises(ValueError, match="another number of requests than 12"):
        saved_targets(tmp_path, "pmet", 12, counting)


def test_a_partial_file_for_another_run_or_bad_sizes_are_refused(tmp_path: Path) -> None:
    def stop_after_one(index: Sequence[int]) -> Targets:
        if index[0] > 0:
            raise Stop
        return _targets(index, attention=False)

    with pytest.raises(Stop):
        saved_targets(tmp_path, "memit", 6, stop_after_one, piece=2)
    with pytest.raises(ValueError, match="saved for 6 requests, not 8"):
        saved_targets(tmp_path, "memit", 8, stop_after_one, piece=2)
    with pytest.raises(ValueError, match="need requests >= 1"):
        saved_targets(tmp_path, "memit", 0, stop_after_one)
    with pytest.raises(ValueError, match="with and without attention"):
        Targets.concatenated([_targets([0]), _targets([1], attention=False)])
