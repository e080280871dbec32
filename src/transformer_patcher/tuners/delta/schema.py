"""The factors of one weight delta on one layer, declared once: ``ΔW = delta_up @ delta_down``.

Both come from a closed-form solve and are never trained; they grow along the rank as edits are appended.
"""

from __future__ import annotations

from transformer_patcher.tuners.tensor_schema import D_IN, D_OUT, RANK, TensorSpec, names

DELTA_TENSORS = (
    TensorSpec("delta_up", (D_OUT, RANK), frozen=True),
    TensorSpec("delta_down", (RANK, D_IN), frozen=True),
)
SPECS = {spec.name: spec for spec in DELTA_TENSORS}
DELTA_TENSOR_NAMES = names(DELTA_TENSORS)


def delta_sizes(rank: int, in_features: int, out_features: int) -> dict[str, int]:
    """The named sizes of a rank-``rank`` delta on an ``in_features`` → ``out_features`` layer."""
    return {RANK: rank, D_IN: in_features, D_OUT: out_features}
