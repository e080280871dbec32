"""Running-text contexts of a token: the nearest negatives of a patch on a later answer token.

At the last FFN of a causal LM the query is shaped mostly by the token being read. A patch that writes the second
token of "Li Yu" reads at " Li", and in running text ("the poems of Du Fu and Li") the query at " Li" comes close
to the edit's: the patch fired there, wrote " Yu" and cost WikiText-2 perplexity (docs/results.md, "Lifelong
editing"). :class:`TokenContexts` indexes where each token occurs in the memory's own text, so the trainer can read
the queries of a handful of those contexts and put the patch's threshold above them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transformer_patcher.methods.patcher.memory import queries_along

WINDOW = 24  # tokens of context, the occurrence last


class TokenContexts:
    """Where each token occurs in a tokenised corpus (one token-id sequence per text), and the windows ending there."""

    def __init__(self, sequences: Sequence[Sequence[int]], per_token: int = 16, window: int = WINDOW):
        if per_token < 1 or window < 1:
            raise ValueError(f"per_token and window must be >= 1, got {per_token} and {window}")
        self.sequences = [list(s) for s in sequences]
        self.per_token, self.window = per_token, window
        self._where: dict[int, list[tuple[int, int]]] = {}
        for i, sequence in enumerate(self.sequences):
            for j, token in enumerate(sequence[1:], start=1):  # an occurrence needs at least one token before it
                self._where.setdefault(token, []).append((i, j))

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> TokenContexts:
        """Index ``texts`` as ``tokenizer`` reads them (no special tokens)."""
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return cls(ids, **kwargs)

    def occurrences(self, token: int) -> int:
        return len(self._where.get(token, ()))

    def windows(self, token: int) -> list[list[int]]:
        """Up to ``per_token`` windows of at most ``window`` tokens ending at ``token``, spread evenly over its
        occurrences (the same ones on every call)."""
        where = self._where.get(token, [])
        if not where:
            return []
        picks = sorted({round(k * (len(where) - 1) / max(self.per_token - 1, 1)) for k in range(self.per_token)})
        return [self.sequences[i][max(0, j + 1 - self.window) : j + 1] for i, j in (where[k] for k in picks)]

    def queries(self, model: nn.Module, layer: Any, tokens: Sequence[int], pad_id: int) -> list[torch.Tensor | None]:
        """Per token, the FFN queries of ``layer`` at the end of its windows (n, d), or None when it never occurs:
        one forward pass, stopped at the patched layer."""
        windows = [self.windows(token) for token in tokens]
        flat = [w for ws in windows for w in ws]
        if not flat:
            return [None] * len(tokens)
        rows = iter(queries_along(model, layer, flat, [[w[-1]] for w in flat], pad_id))
        return [torch.cat([next(rows) for _ in ws]) if ws else None for ws in windows]
