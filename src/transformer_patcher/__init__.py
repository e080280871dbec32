"""transformer-patcher: fix a deployed transformer's mistakes one by one with a few trainable neurons.

    fixer = Patcher.from_pretrained("smollm2-135m", patches="fixes/")
    fixer.fix("What is the capital of Australia?", "Canberra")

The package registers the ``"PATCHER"`` (patch neurons) and ``"DELTA"`` (low-rank weight deltas) adapter types with
peft, after which ``PeftModel.from_pretrained`` (or transformers' ``load_adapter``) loads saved adapters of either
type like any other. ``import transformer_patcher`` itself is cheap: it imports neither torch nor peft. The public
names below are imported on first use (PEP 562), and the registration happens as soon as peft is imported too, in
either order: at once when peft already is, otherwise right after peft's own import (see ``_PeftRegistration``).
"""

from __future__ import annotations

import contextlib as _contextlib
import importlib as _importlib
import sys as _sys
import threading as _threading
import warnings as _warnings
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

__version__ = "0.1.0"

# public name → the module that defines it, imported on first access
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "AdapterFileError",
            "FingerprintMismatchError",
            "FolderLockedError",
            "InvalidExampleError",
            "InvalidPatchError",
            "NonFiniteError",
            "PatcherError",
            "PatchMergeError",
            "PromptFormatError",
            "UnknownModelError",
            "UnsupportedArchitectureError",
            "UnverifiedAdapterError",
        ),
        "transformer_patcher.core.errors",
    ),
    **dict.fromkeys(("FixReport", "Patcher"), "transformer_patcher.experiments.fixer"),
    **dict.fromkeys(("DELTA", "DeltaConfig"), "transformer_patcher.tuners.delta.config"),
    "DeltaLayer": "transformer_patcher.tuners.delta.layer",
    **dict.fromkeys(("DeltaModel", "get_delta_model"), "transformer_patcher.tuners.delta.model"),
    **dict.fromkeys(("PATCHER", "PatcherConfig"), "transformer_patcher.tuners.patcher.config"),
    **dict.fromkeys(("PatchCapture", "PatcherLayer"), "transformer_patcher.tuners.patcher.layer"),
    **dict.fromkeys(("PatcherModel", "get_patcher_model"), "transformer_patcher.tuners.patcher.model"),
    "init_key": "transformer_patcher.tuners.patcher.keys",
    **dict.fromkeys(("resolve_patch_target", "supported_model_types"), "transformer_patcher.tuners.architectures"),
}

__all__ = [
    "DELTA",
    "PATCHER",
    "AdapterFileError",
    "DeltaConfig",
    "DeltaLayer",
    "DeltaModel",
    "FingerprintMismatchError",
    "FixReport",
    "FolderLockedError",
    "InvalidExampleError",
    "InvalidPatchError",
    "NonFiniteError",
    "PatchCapture",
    "PatchMergeError",
    "Patcher",
    "PatcherConfig",
    "PatcherError",
    "PatcherLayer",
    "PatcherModel",
    "PromptFormatError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "UnverifiedAdapterError",
    "get_delta_model",
    "get_patcher_model",
    "init_key",
    "resolve_patch_target",
    "supported_model_types",
]

if _TYPE_CHECKING:  # what type checkers and IDEs see; at run time ``__getattr__`` imports them on first use
    from transformer_patcher.core.errors import (
        AdapterFileError,
        FingerprintMismatchError,
        FolderLockedError,
        InvalidExampleError,
        InvalidPatchError,
        NonFiniteError,
        PatcherError,
        PatchMergeError,
        PromptFormatError,
        UnknownModelError,
        UnsupportedArchitectureError,
        UnverifiedAdapterError,
    )
    from transformer_patcher.experiments.fixer import FixReport, Patcher
    from transformer_patcher.tuners.architectures import resolve_patch_target, supported_model_types
    from transformer_patcher.tuners.delta.config import DELTA, DeltaConfig
    from transformer_patcher.tuners.delta.layer import DeltaLayer
    from transformer_patcher.tuners.delta.model import DeltaModel, get_delta_model
    from transformer_patcher.tuners.patcher.config import PATCHER, PatcherConfig
    from transformer_patcher.tuners.patcher.keys import init_key
    from transformer_patcher.tuners.patcher.layer import PatchCapture, PatcherLayer
    from transformer_patcher.tuners.patcher.model import PatcherModel, get_patcher_model


def __getattr__(name: str) -> _Any:
    """A public name, imported from its module on first access (then kept as a plain attribute)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# ------------------------------------------------------------------------------------- peft registration
_TUNERS = ("transformer_patcher.tuners.patcher.model", "transformer_patcher.tuners.delta.model")  # register on import


class _PeftRegistration:
    """A ``sys.meta_path`` finder that registers the package's peft types once peft has been imported.

    It wraps the loader of ``peft`` and, while it waits, of this package's own modules: after one of them has run,
    if peft is loaded and none of this package's modules is still half-way through its own import, it removes
    itself and imports the tuners, which register with peft. Waiting for the package's modules matters when peft is
    first imported from inside them (``from transformer_patcher.tuners.patcher.config import ...`` imports peft
    half-way): the tuners are then imported once the outermost of those imports has finished, never from a half-run
    module.
    """

    def __init__(self) -> None:
        self.running: set[str] = set()  # this package's modules whose code is running, through our loaders

    def find_spec(self, fullname: str, path: _Any = None, target: _Any = None) -> _Any:
        if fullname != "peft" and not fullname.startswith(__name__ + "."):
            return None
        for finder in _sys.meta_path:  # the spec the other finders give, with its loader wrapped
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ChainedLoader(spec.loader, self)
        return spec

    def ran(self, name: str, ran: bool) -> None:
        """Module ``name`` ran (or failed: ``ran`` False) through one of our loaders."""
        with _LOCK:
            self.running.discard(name)
            peft = _sys.modules.get("peft")
            if not ran or peft is None or self.running:
                return
            if name != "peft" and getattr(getattr(peft, "__spec__", None), "_initializing", False):
                return  # peft itself is half-way through its import (in another thread): its own wrapper fires
            _register()

    def install(self) -> None:
        """Put the hook first on ``sys.meta_path``, replacing one a previous import of this module left there
        (``importlib.reload``)."""
        for finder in list(_sys.meta_path):
            if type(finder).__name__ == type(self).__name__ and type(finder).__module__ == __name__:
                _remove(finder)
        _sys.meta_path.insert(0, self)


def _remove(finder: object) -> None:
    with _contextlib.suppress(ValueError):  # another thread removed it first
        _sys.meta_path.remove(finder)


class _ChainedLoader:
    """``loader`` with ``_PeftRegistration.ran`` called after each module it runs; the module itself keeps seeing
    ``loader`` as its loader."""

    def __init__(self, loader: _Any, hook: _PeftRegistration) -> None:
        self.loader = loader
        self.hook = hook

    def __getattr__(self, name: str) -> _Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self.loader, name)

    def create_module(self, spec: _Any) -> _Any:
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: _Any) -> None:
        module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        if module.__name__ != "peft":
            self.hook.running.add(module.__name__)
        ran = False
        try:
            self.loader.exec_module(module)
            ran = True
        finally:
            self.hook.ran(module.__name__, ran)


_HOOK = _PeftRegistration()
_LOCK = _threading.RLock()  # one registration, whichever thread finishes an import first


def _register() -> None:
    """Import the tuners (each registers its peft type), once. A failure is a warning that names the error, so that
    peft stays usable for other adapters; loading a PATCHER or DELTA folder then fails in peft (``KeyError``), and
    importing ``transformer_patcher.tuners.patcher.model`` raises the error itself."""
    with _LOCK:
        _remove(_HOOK)
        try:
            for tuner in _TUNERS:
                _importlib.import_module(tuner)
        except Exception as error:  # reported here; any use of the tuners raises it again
            _warnings.warn(
                f"transformer_patcher could not register its peft types (PATCHER, DELTA): {error!r}",
                RuntimeWarning,
                stacklevel=3,
            )


if "peft" in _sys.modules:
    _register()
else:
    _HOOK.install()
