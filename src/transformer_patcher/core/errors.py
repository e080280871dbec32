"""Exception types: every refusal the package makes is one of these, so callers can catch them precisely."""

from __future__ import annotations


class PatcherError(Exception):
    """Base class of every error raised on purpose by transformer-patcher."""


class UnsupportedArchitectureError(PatcherError, ValueError):
    """The model has no FFN the registry or the fallback heuristic can patch (e.g. a mixture-of-experts block)."""


class AdapterFileError(PatcherError, ValueError):
    """An adapter directory or file is missing, corrupted, not safetensors, or inconsistent with its config."""


class FingerprintMismatchError(AdapterFileError):
    """An adapter was made for a different base model than the one it is being loaded into."""


class UnverifiedAdapterError(FingerprintMismatchError):
    """A saved adapter records no base-model fingerprint, so nothing shows it belongs to this model.

    A subclass of ``FingerprintMismatchError``: the same explicit opt-out (``check_fingerprint=False``) attaches it.
    """


class InvalidPatchError(PatcherError, ValueError):
    """Patch tensors with the wrong shape or dtype, or holding NaN/inf, or an unknown edit id."""


class PatchMergeError(PatcherError, NotImplementedError):
    """Patches cannot be merged into the base weights: a patch is non-linear in its input."""


class InvalidExampleError(PatcherError, ValueError):
    """An example the task cannot use: empty text, a label outside the head, or a target the tokenizer cannot encode."""


class FolderLockedError(PatcherError, RuntimeError):
    """An output folder is in use by another run: two writers would interleave their checkpoints and results."""


class NonFiniteError(PatcherError, ArithmeticError):
    """An edit's loss or patch parameters became NaN/inf during training; the edit was rolled back, nothing changed."""


class PromptFormatError(PatcherError, ValueError):
    """A prompt format the tokenizer cannot serve (chat without a chat template) or a malformed template string."""


class UnknownModelError(PatcherError, ValueError):
    """A model name that is neither a package short name, a local model folder, nor a Hub id reachable from here."""
