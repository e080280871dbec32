"""Which subjects a model holds to be alike: the nearest neighbours of a subject by its input embeddings.

An edit's threshold sits above its contrasts, the edit's question asked of other subjects. Drawn at random from a
pool of thousands (mostly people and organisations), they are unlike the subjects a fix is most likely to leak to:
after "What is the capital of Turkey?" → "Ankara" with random contrasts, SmolLM2 answered "Ankara" for Greece and
Syria too. Contrasts asked of the subjects nearest to the edit's own (Thailand, Romania, Bulgaria, Croatia for
Turkey) put the threshold where it separates those. Nearness is the cosine of the mean input embedding of the
subject's tokens: no forward pass, a few milliseconds for 10,000 subjects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from transformer_patcher.core.examples import EditExample


@runtime_checkable
class ContrastPool(Protocol):
    """An edit's contrasts drawn from a pool of subjects (``data.questions.Contrasts``): ``nearest`` names pool
    subjects to ask first."""

    subjects: Sequence[str]

    def __call__(self, example: EditExample, nearest: Sequence[str] = ()) -> Sequence[str]: ...


class SubjectIndex:
    """Normalised mean input embeddings of a pool of subjects, for :meth:`nearest` lookups."""

    def __init__(self, embeddings: torch.Tensor, tokenizer: Any, subjects: Sequence[str]) -> None:
        self.embeddings = embeddings.detach()
        self.tokenizer = tokenizer
        self.subjects = list(subjects)
        self._folded = [s.casefold() for s in self.subjects]
        self.vectors = torch.stack([self._vector(s) for s in self.subjects]) if self.subjects else None

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, subjects: Sequence[str]) -> SubjectIndex:
        return cls(model.get_input_embeddings().weight, tokenizer, subjects)

    def _vector(self, subject: str) -> torch.Tensor:
        ids = self.tokenizer(" " + subject, add_special_tokens=False)["input_ids"] or [0]
        return F.normalize(self.embeddings[ids].float().mean(0), dim=0).cpu()

    def nearest(self, subject: str, count: int) -> list[str]:
        """The ``count`` pool subjects most like ``subject``, most alike first, never ``subject`` itself (any case)
        nor one that contains it or is contained in it ("Turkey" keeps "Kurdish rebellions in Turkey" out)."""
        if self.vectors is None or count <= 0:
            return []
        folded = subject.casefold()
        order = (self.vectors @ self._vector(subject)).argsort(descending=True).tolist()
        chosen = [i for i in order if folded not in self._folded[i] and self._folded[i] not in folded]
        return [self.subjects[i] for i in chosen[:count]]
