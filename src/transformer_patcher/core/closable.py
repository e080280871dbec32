"""Objects that hold a resource until ``close()`` (a patch folder's lock), usable as ``with`` blocks."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound="Closable")


class Closable:
    """``with obj:`` closes ``obj`` when the block ends, however it ends."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError
