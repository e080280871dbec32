"""How an adapter declares its tensors once: name, whether they are frozen, shape in named sizes, kind of values.

Each tuner lists its tensors here-shaped (``patcher.schema``, ``delta.schema``) and every reader derives what it needs
from that one list: the layer the shapes and dtypes it creates, the file checks the shapes they expect, the size bound
the bytes a row may take, and the patch-set tools which tensors label the rows of which.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

# The named sizes a shape is written in.
PATCHES = "patches"  # patch neurons (committed ones for a frozen tensor, in-progress ones otherwise)
RANK = "rank"  # rank-1 terms of a low-rank delta
D_IN = "d_in"  # input features of the layer the adapter extends (the FFN query for patches)
D_OUT = "d_out"  # its output features
ROW_SIZES = (PATCHES, RANK)  # the sizes that grow as an adapter grows

FLOAT: Literal["float"] = "float"
ID: Literal["id"] = "id"
ID_DTYPE = "int64"  # torch/safetensors dtype name of the edit ids
ID_BYTES = 8
PEFT_KEY_PREFIX = "base_model.model."  # how peft names an adapter tensor in its file: prefix + module + tensor


@dataclass(frozen=True)
class TensorSpec:
    """One per-adapter tensor: ``frozen`` ones are never trained; ``kind`` is ``"float"`` (values in the adapter's
    float dtype, finite) or ``"id"`` (int64 edit ids). ``trained=False`` keeps a float tensor of the in-progress side
    out of training too (a value fixed when the row is made); an ``optional`` one may be missing from a file written
    before it existed, and is then zero."""

    name: str
    shape: tuple[str, ...]
    frozen: bool
    kind: Literal["float", "id"] = FLOAT
    trained: bool = True
    optional: bool = False

    def shape_for(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape for ``sizes`` (named size → value)."""
        return tuple(sizes[size] for size in self.shape)

    @property
    def per_row(self) -> bool:
        """Whether the tensor grows with the adapter (one row per patch or rank-1 term), not a fixed size."""
        return any(size in ROW_SIZES for size in self.shape)

    def row_width(self, sizes: Mapping[str, int]) -> int:
        """Values per row: the product of the sizes that do not grow with the adapter (0 for a fixed tensor)."""
        if not self.per_row:
            return 0
        width = 1
        for size in self.shape:
            if size not in ROW_SIZES:
                width *= sizes[size]
        return width


def names(specs: Iterable[TensorSpec]) -> tuple[str, ...]:
    return tuple(spec.name for spec in specs)


def row_bytes(specs: Iterable[TensorSpec], sizes: Mapping[str, int], float_bytes: int) -> int:
    """Most bytes one row of the adapter takes in a file: the larger of its frozen and its other tensors, floats in
    ``float_bytes`` and ids in int64."""
    totals = {True: 0, False: 0}
    for spec in specs:
        totals[spec.frozen] += spec.row_width(sizes) * (ID_BYTES if spec.kind == ID else float_bytes)
    return max(totals.values())


def fixed_bytes(specs: Iterable[TensorSpec], sizes: Mapping[str, int], float_bytes: int) -> int:
    """Bytes the adapter's fixed-size tensors (those without a row size) take in a file, whatever its row count."""
    total = 0
    for spec in specs:
        if not spec.per_row:
            count = 1
            for size in spec.shape_for(sizes):
                count *= size
            total += count * (ID_BYTES if spec.kind == ID else float_bytes)
    return total
