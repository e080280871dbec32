"""Counted fuzz campaigns, shared by the test suite (few cases, every run) and ``bench/reliability.py`` (many cases,
for the figures in docs/reliability.md).

A campaign is a function ``(max_examples) -> Counter`` registered with :func:`campaign`. Inside, a hypothesis
``@given`` body tries one case, asserts the contract (a clear error and nothing changed, or a documented behaviour),
and tallies the outcome under a short label. Any broken contract raises, so a campaign that returns has passed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, settings

Campaign = Callable[[int], Counter]
CAMPAIGNS: dict[str, Campaign] = {}


def campaign(name: str) -> Callable[[Campaign], Campaign]:
    """Register a campaign under ``name`` (e.g. ``"adapter file: patcher"``)."""

    def register(function: Campaign) -> Campaign:
        if name in CAMPAIGNS:
            raise ValueError(f"campaign {name!r} is registered twice")
        CAMPAIGNS[name] = function
        return function

    return register


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible settings: derandomized, no example database, no deadline (CPU timing is noisy)."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def outcome_label(error: BaseException) -> str:
    """The tally label of a refusal: its exception type."""
    return f"refused: {type(error).__name__}"
