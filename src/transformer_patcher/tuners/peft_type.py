"""The package's peft types as a ``str`` enum, shaped like peft's own ``PeftType``.

peft's ``PeftType`` cannot be extended, and code outside peft reads ``config.peft_type.value`` (transformers'
``load_adapter`` does), so a plain string breaks there. A ``str`` enum member is equal to and hashes like its string,
serialises to it in ``adapter_config.json``, and also has ``.value``.
"""

from __future__ import annotations

import enum


class AdapterType(str, enum.Enum):
    """``"PATCHER"``: patch neurons on an FFN; ``"DELTA"``: low-rank weight deltas."""

    PATCHER = "PATCHER"
    DELTA = "DELTA"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
