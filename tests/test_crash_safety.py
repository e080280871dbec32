"""Crash safety: a real run SIGKILLed at random edits and half-way through every kind of write resumes to exactly the
result of an uninterrupted run. The full campaign (20 kills over 200 edits) is ``bench/reliability.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from crash_campaign import END_POINTS, STREAM_POINTS, plan_kills, run_crash_campaign


def test_kill_plan_covers_every_write_and_stays_in_the_stream() -> None:
    plan = plan_kills(20, 200, seed=0)
    assert len(plan) == 20
    assert {point for point, _, _ in plan} == {"edit", *STREAM_POINTS, *END_POINTS}
    positions = [position for point, position, _ in plan if point not in END_POINTS]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert all(1 <= p < 200 for p in positions)
    with pytest.raises(ValueError, match="do not fit"):
        plan_kills(20, 10, seed=0)


@pytest.mark.parametrize("seed", [0])
def test_runs_killed_anywhere_resume_to_the_uninterrupted_result(tmp_path: Path, seed: int) -> None:
    figures = run_crash_campaign(tmp_path, n_examples=12, n_kills=6, seed=seed)
    assert figures["edits"] >= 6  # the tiny model gets most random answers wrong: there is something to lose
    assert figures["kills_landed"] == figures["kills_planned"] == 6, figures["kills"]
    assert figures["edits_lost"] == figures["edits_extra"] == figures["records_lost"] == 0
    assert figures["records_identical"] and figures["edit_log_identical"] and figures["metrics_identical"]
    assert figures["patches_bit_identical"]
