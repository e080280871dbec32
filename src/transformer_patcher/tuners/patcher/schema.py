"""The patch tensors of one adapter on one FFN, declared once.

Committed patches are frozen buffers; in-progress ones are the trainable parameters (values factored ``v' ⊙ a``) plus
their edit ids. Every patch row carries the id of the edit that created it, in the edit-id tensor of its side, the
subject read its gate opens on (``tuners.patcher.gate``; a zero row: ungated, which is every row of a file written
before the gate existed) and its *bare* subject read, the subject named alone at a text's start, which opens the gate
too (a zero row: none, which is every row of a file written before it existed). One fixed-size tensor per adapter, the
gate frame (``tuners.patcher.gate``: the gate block's mean output and inverse spread), says how the subject reads are
compared; zero: plain cosines.
"""

from __future__ import annotations

from transformer_patcher.tuners.tensor_schema import D_IN, D_OUT, FLOAT, ID, PATCHES, TensorSpec, names

FRAME = "frame"  # rows of the gate frame: the gate block's mean output and its inverse spread
PATCH_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what patch_dtype may name

PATCH_TENSORS = (
    TensorSpec("patch_frozen_keys", (PATCHES, D_IN), frozen=True),
    TensorSpec("patch_frozen_bias", (PATCHES,), frozen=True),
    TensorSpec("patch_frozen_values", (PATCHES, D_OUT), frozen=True),
    TensorSpec("patch_frozen_edit_ids", (PATCHES,), frozen=True, kind=ID),
    TensorSpec("patch_frozen_subjects", (PATCHES, D_OUT), frozen=True, optional=True),
    TensorSpec("patch_frozen_bare_subjects", (PATCHES, D_OUT), frozen=True, optional=True),
    TensorSpec("patch_keys", (PATCHES, D_IN), frozen=False),
    TensorSpec("patch_bias", (PATCHES,), frozen=False),
    TensorSpec("patch_values", (PATCHES, D_OUT), frozen=False),
    TensorSpec("patch_value_scale", (PATCHES, D_OUT), frozen=False),
    TensorSpec("patch_edit_ids", (PATCHES,), frozen=False, kind=ID),
    TensorSpec("patch_subjects", (PATCHES, D_OUT), frozen=False, trained=False, optional=True),
    TensorSpec("patch_bare_subjects", (PATCHES, D_OUT), frozen=False, trained=False, optional=True),
    TensorSpec("patch_gate_frame", (FRAME, D_OUT), frozen=True, optional=True),
)
SPECS = {spec.name: spec for spec in PATCH_TENSORS}

PATCH_TENSOR_NAMES = names(PATCH_TENSORS)
FROZEN = names(spec for spec in PATCH_TENSORS if spec.frozen and spec.per_row)  # committed patches' rows
TRAINABLE = names(spec for spec in PATCH_TENSORS if not spec.frozen)
GATE_FRAME = "patch_gate_frame"
PARAMETERS = names(  # what training moves
    spec for spec in PATCH_TENSORS if not spec.frozen and spec.kind == FLOAT and spec.trained
)
BUFFERS = names(spec for spec in PATCH_TENSORS if spec.name not in PARAMETERS)
EDIT_IDS = names(spec for spec in PATCH_TENSORS if spec.kind == ID)
SUBJECTS = {True: "patch_frozen_subjects", False: "patch_subjects"}  # by side: frozen or not
BARE_SUBJECTS = {True: "patch_frozen_bare_subjects", False: "patch_bare_subjects"}


def edit_ids_for(name: str) -> str:
    """The edit-id tensor that labels the rows of patch tensor ``name`` (the one on its frozen or in-progress side)."""
    frozen = SPECS[name].frozen
    return next(ids for ids in EDIT_IDS if SPECS[ids].frozen == frozen)


def patch_sizes(patches: int, query_dim: int, output_dim: int) -> dict[str, int]:
    """The named sizes of ``patches`` neurons on an FFN with queries of ``query_dim`` and outputs of ``output_dim``."""
    return {PATCHES: patches, D_IN: query_dim, D_OUT: output_dim, FRAME: 2}
