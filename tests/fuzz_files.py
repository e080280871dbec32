"""Fuzz campaigns for every file the package reads from elsewhere: adapter folders (PATCHER and DELTA, weights and
config), memory banks, PMET key statistics and SME resumable checkpoints.

Each case writes one mutated copy of a valid file into a temporary folder and loads it. The contract: a clear error of
the package's own classes (naming the file, or the base-model fact that differs) with the model untouched, or a load
that yields exactly the original tensors. Two documented exceptions are tallied under their own labels: safetensors
has no checksum, so a byte flip inside tensor data that leaves finite values loads as written; and a config value
that is valid but different (another activation, say) is applied as written. Adapter files are also given finite but
absurd magnitudes and consistent headers declaring gigabytes (a sparse file), and fingerprints are set to null,
stripped of their whole-model views or altered, against models that share the adapted layers or carry 1 % noise.

A last campaign fuzzes a saved patch set's entries rather than its bytes: links, FIFOs and a sparse file in it, the
folder or its lock file a link, through every entry point that reads or rewrites a patch set (library and CLI).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import stat
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save

from fuzzing import campaign, fuzz_settings, outcome_label
from tiny_models import build, inputs_for, logits
from transformer_patcher import (
    AdapterFileError,
    DeltaConfig,
    DeltaLayer,
    DeltaModel,
    FingerprintMismatchError,
    PatcherConfig,
    PatcherError,
    PatcherLayer,
    PatcherModel,
    UnsupportedArchitectureError,
    get_delta_model,
    get_patcher_model,
)
from transformer_patcher.cli import main
from transformer_patcher.experiments.sme.run_state import load_checkpoint, save_checkpoint
from transformer_patcher.methods.patcher.memory import MemoryBank
from transformer_patcher.methods.pmet import covariance
from transformer_patcher.tuners.patcher.patch_set import (
    EDIT_LOG,
    describe_patch_set,
    edit_log_entry,
    remove_edit_from_files,
    write_edit_log,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
HARMLESS = "harmless: loads the original"
AS_WRITTEN = "accepted: finite tensor bytes loaded as written (safetensors has no checksum)"
CONFIG_AS_WRITTEN = "accepted: original tensors, a valid config value applied as written"
LLAMA_DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
HUGE = 2**64 - 1


# ----------------------------------------------------------------------------------------------- contract
def assert_untouched(model: torch.nn.Module, reference: torch.Tensor, names: list[str]) -> None:
    """No tuner layer of either kind, no ``peft_config``, the same parameters, bit-identical logits."""
    assert not any(isinstance(m, (PatcherLayer, DeltaLayer)) for m in model.modules())
    assert not hasattr(model, "peft_config")
    assert list(model.state_dict()) == names
    assert torch.equal(logits(model, inputs_for(model)), reference)


def assert_clear(error: BaseException, *paths: Path) -> None:
    """A package error; a file error names the file (a fingerprint or architecture error names the fact)."""
    assert isinstance(error, PatcherError), f"{type(error).__name__} leaked: {error}"
    if isinstance(error, AdapterFileError) and not isinstance(error, FingerprintMismatchError):
        assert any(str(path) in str(error) for path in paths), f"the message does not name the file: {error}"
    else:
        assert isinstance(error, (FingerprintMismatchError, UnsupportedArchitectureError)), repr(error)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def readable(data: bytes) -> dict[str, torch.Tensor] | None:
    """The tensors a mutated file holds, when it is still valid safetensors."""
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(data)
        handle.flush()
        try:
            return load_file(handle.name)
        except Exception:
            return None


def accepted(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor], written: bytes | None) -> str:
    """Label a load that succeeded: it must give the original tensors, or exactly what the mutated file holds."""
    if same_tensors(loaded, original):
        return HARMLESS
    as_written = readable(written) if written is not None else None
    assert as_written is not None, "the load yields neither the original tensors nor a readable file's"
    assert all(not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in loaded.values())
    if same_tensors(loaded, as_written):
        return AS_WRITTEN
    converted = {k: v.to(loaded[k].dtype) for k, v in as_written.items() if k in loaded}
    assert same_tensors(loaded, converted), "the load yields neither the original tensors nor the file's"
    assert {t.dtype for t in as_written.values()} <= {torch.bfloat16}, "only bfloat16 memory rows are converted"
    return "accepted: bfloat16 rows (how a half-precision bank is saved), converted"


# ---------------------------------------------------------------------------------------- file mutations
@dataclass(frozen=True)
class Mutation:
    kind: str
    data: bytes
    size: int | None = None  # the file is extended to this many bytes: a sparse tail of zeros


def write_mutation(path: Path, mutation: Mutation) -> None:
    path.write_bytes(mutation.data)
    if mutation.size is not None:
        with open(path, "r+b") as handle:
            handle.truncate(mutation.size)


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _with_header(header: object, buffer: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + buffer


def _flip(data: bytes, at: int, mask: int) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


_DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool, torch.float8_e4m3fn]
_CODES = ["F64", "F32", "F16", "BF16", "I8", "I32", "I64", "U8", "BOOL", "F8_E4M3", "U64", "C64", "XX"]
_SHAPES = st.sampled_from([[2**40, 2**40], [2**62], [2**31, 2**31, 2**31], [0, 2**62], [HUGE], [2**20, 2**20]]) | (
    st.lists(st.integers(0, HUGE), max_size=4)
)


def _retyped(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        return tensor.float().clamp(-400, 400).to(dtype)
    return tensor.to(dtype)


def safetensors_mutations(original: bytes) -> st.SearchStrategy[Mutation]:
    """Truncations, byte flips, hand-crafted headers (huge or inconsistent shapes/offsets/lengths) and tensor-level
    edits (dtype, shape, renamed/extra/missing tensors, NaN/inf, metadata) of the safetensors file ``original``."""
    header, buffer = _header(original)
    metadata = header.get("__metadata__")
    names = sorted(k for k in header if k != "__metadata__")
    tensors = readable(original)
    assert tensors is not None
    n = len(original)

    def tensor_level(edit: Callable[[dict[str, torch.Tensor]], object], kind: str, meta: object = metadata) -> Mutation:
        copy = {k: v.clone() for k, v in tensors.items()}
        edit(copy)
        return Mutation(kind, save(copy, metadata=meta))

    def crafted(name: str, field_: str, value: object) -> Mutation:
        edited = json.loads(json.dumps(header))
        edited[name][field_] = value
        return Mutation(f"crafted header: {field_}", _with_header(edited, buffer))

    def retype(name: str, dtype: torch.dtype) -> Mutation:
        return tensor_level(lambda t: t.__setitem__(name, _retyped(t[name], dtype)), "wrong dtype")

    def reshape(name: str, shape: list[int]) -> Mutation:
        return tensor_level(lambda t: t.__setitem__(name, torch.zeros(shape, dtype=t[name].dtype)), "wrong shape")

    def rename(name: str, new: str) -> Mutation:
        return tensor_level(lambda t: t.__setitem__(new, t.pop(name)), "renamed tensor")

    def extra(new: str) -> Mutation:
        return tensor_level(lambda t: t.__setitem__(new, torch.zeros(2, 2)), "extra tensor")

    def missing(name: str) -> Mutation:
        return tensor_level(lambda t: t.pop(name), "missing tensor")

    def set_value(name: str, value: float, where: int, kind: str) -> Mutation:
        def edit(t: dict[str, torch.Tensor]) -> None:
            flat = t[name].reshape(-1)
            if flat.numel() and flat.is_floating_point():
                flat[where % flat.numel()] = value

        return tensor_level(edit, kind)

    def new_metadata(value: dict[str, str] | None) -> Mutation:
        return tensor_level(lambda t: None, "metadata", value)

    name = st.sampled_from(names)
    suffixes = st.sampled_from(["", ".x", "_", "s"]) | st.text("abc._", max_size=6)
    strings = st.text(max_size=12)
    return st.one_of(
        st.integers(0, n - 1).map(lambda i: Mutation("truncated", original[:i])),
        st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(lambda p: Mutation("byte flip", _flip(original, *p))),
        st.builds(crafted, name, st.just("shape"), _SHAPES),
        st.builds(
            crafted,
            name,
            st.just("data_offsets"),
            st.lists(st.integers(0, HUGE) | st.integers(0, len(buffer)), min_size=2, max_size=2),
        ),
        st.builds(crafted, name, st.just("dtype"), st.sampled_from(_CODES)),
        st.integers(0, HUGE).map(lambda k: Mutation("header length", _with_header(header, buffer, k))),
        st.builds(retype, name, st.sampled_from(_DTYPES)),
        st.builds(reshape, name, st.lists(st.integers(0, 40), max_size=3)),
        st.builds(rename, name, st.builds(lambda k, s: k + s, name, suffixes)),
        st.builds(extra, st.sampled_from(["base_model.model.lm_head.weight", "rows2", "mom2.x"]) | strings),
        st.builds(missing, name),
        st.builds(
            set_value,
            name,
            st.sampled_from([float("nan"), float("inf"), -float("inf")]),
            st.integers(0, 99),
            st.just("NaN/inf"),
        ),
        st.builds(
            set_value,
            name,
            st.sampled_from([3e38, -3e38, 1e30, 1e12, -1e8]),
            st.integers(0, 99),
            st.just("finite but absurd magnitude"),
        ),
        st.builds(
            new_metadata, st.none() | st.dictionaries(st.sampled_from(["key", "module", "tokens", "format"]), strings)
        ),
    )


def declared_huge(original: bytes, name: str, shape: list[int]) -> Mutation:
    """``original`` rewritten so that tensor ``name`` has ``shape``: header, offsets and file size consistent, the new
    data a sparse tail of zeros, as a forged file declaring gigabytes would be."""
    header, buffer = _header(original)
    others = sorted((k for k in header if k not in ("__metadata__", name)), key=lambda k: header[k]["data_offsets"])
    kept = b""
    for key in others:
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [len(kept), len(kept) + end - start]
        kept += buffer[start:end]
    nbytes = math.prod(shape) * {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2}[header[name]["dtype"]]
    header[name] = {**header[name], "shape": shape, "data_offsets": [len(kept), len(kept) + nbytes]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + kept
    return Mutation("declared huge (consistent header, sparse data)", data, len(data) + nbytes)


def declared_size_mutations(original: bytes) -> st.SearchStrategy[Mutation]:
    """One tensor of ``original`` declared 0.25–4 GB large, along its rows or its columns, in a consistent file."""
    header, _ = _header(original)
    names = sorted(k for k in header if k != "__metadata__")

    def build_one(name: str, exponent: int, along_rows: bool) -> Mutation:
        shape = list(header[name]["shape"]) or [1]
        shape[0 if along_rows or len(shape) == 1 else -1] = 2**exponent
        return declared_huge(original, name, shape)

    return st.builds(build_one, st.sampled_from(names), st.integers(26, 29), st.booleans())


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(2**53, 2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    copy = json.loads(json.dumps(data))
    target = copy
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return copy


_DELETE = object()


def json_mutations(original: dict[str, Any], plausible: st.SearchStrategy[object]) -> st.SearchStrategy[Mutation]:
    """Field deletions, extra fields, wrong types, NaN/Infinity, huge numbers, non-object JSON, invalid UTF-8,
    truncation, byte flips and deep nesting of the JSON object ``original``."""
    paths = [(k,) for k in original] + [(k, sub) for k, v in original.items() if isinstance(v, dict) for sub in v]
    text = json.dumps(original, indent=2).encode()
    path = st.sampled_from(paths)

    def dump(kind: str, value: object) -> Mutation:
        return Mutation(kind, json.dumps(value, indent=2).encode())

    return st.one_of(
        st.builds(lambda p, v: dump(f"field {'.'.join(p)} replaced", _set_path(original, p, v)), path, JSON_VALUES),
        st.builds(lambda p, v: dump(f"field {'.'.join(p)} plausible", _set_path(original, p, v)), path, plausible),
        st.builds(lambda p: dump(f"field {'.'.join(p)} missing", _set_path(original, p, _DELETE)), path),
        st.builds(lambda k, v: dump("extra field", {**original, k: v}), st.text(max_size=10), JSON_VALUES),
        JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(lambda v: dump("not an object", v)),
        st.integers(0, len(text) - 1).map(lambda i: Mutation("truncated", text[:i])),
        st.tuples(st.integers(0, len(text) - 1), st.integers(1, 255)).map(
            lambda p: Mutation("byte flip", _flip(text, *p))
        ),
        st.tuples(st.integers(0, len(text)), st.binary(min_size=1, max_size=4).map(lambda b: b"\xff" + b)).map(
            lambda p: Mutation("invalid UTF-8", text[: p[0]] + p[1] + text[p[0] :])
        ),
        st.sampled_from([40, 2000, 100_000]).map(
            lambda depth: (
                dump("deeply nested", {**original, "fingerprint": json.loads("[" * depth + "]" * depth)})
                if depth < 900
                else Mutation("deeply nested", text[:-2] + b', "x": ' + b"[" * depth + b"]" * depth + b"}")
            )
        ),
    )


# ------------------------------------------------------------------------------------------ adapter folders
@dataclass
class AdapterSetup:
    """A saved adapter folder, the base model it loads into, and what a correct load gives."""

    peft_type: str
    folder: Path
    load: Callable[..., PeftModel]
    fresh: Callable[[], torch.nn.Module]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    adapted: torch.Tensor | None = None
    model: torch.nn.Module | None = None
    reference: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tensors = load_file(self.folder / WEIGHTS)
        self.config = json.loads((self.folder / CONFIG).read_text())
        self.weights = (self.folder / WEIGHTS).read_bytes()
        self.reset()
        loaded = self.load(self.fresh(), self.folder)
        self.adapted = logits(loaded, inputs_for(loaded))

    def reset(self) -> None:
        self.model = self.fresh()
        self.reference = logits(self.model, inputs_for(self.model))
        self.names = list(self.model.state_dict())

    def copy(self, into: str) -> Path:
        return Path(shutil.copytree(self.folder, Path(into) / "adapter"))


def patcher_setup(tmp: str) -> AdapterSetup:
    torch.manual_seed(0)
    model = get_patcher_model(build("llama"), PatcherConfig())
    layer = model.patch_layer()
    layer.add_patches(torch.randn(3, 32), torch.zeros(3), torch.randn(3, 32), edit_id=[1, 2, 3])
    layer.commit()
    layer.add_patches(torch.randn(1, 32), torch.zeros(1), torch.randn(1, 32), edit_id=4)
    model.save_pretrained(Path(tmp) / "saved")
    return AdapterSetup("PATCHER", Path(tmp) / "saved", PatcherModel.from_pretrained, lambda: build("llama"))


def delta_setup(tmp: str) -> AdapterSetup:
    model = get_delta_model(build("llama"), DeltaConfig(target_modules=LLAMA_DOWN))
    g = torch.Generator().manual_seed(0)
    for rank, layer in zip((2, 3), model.base_model.delta_layers().values(), strict=True):
        layer.add_delta("default", torch.randn(32, rank, generator=g) * 0.2, torch.randn(rank, 64, generator=g) * 0.2)
    model.save_pretrained(Path(tmp) / "saved")
    return AdapterSetup("DELTA", Path(tmp) / "saved", DeltaModel.from_pretrained, lambda: build("llama"))


def _dispatches_to_package(folder: Path) -> bool | None:
    """Whether peft's own ``PeftConfig._get_peft_type`` reaches a package config class (None: it fails first)."""
    try:
        with open(folder / CONFIG, encoding="utf-8") as handle:
            peft_type = json.load(handle)["peft_type"]
    except Exception:
        return None
    return peft_type in ("PATCHER", "DELTA") if isinstance(peft_type, str) else False


def load_adapter_folder(setup: AdapterSetup, folder: Path, written: bytes | None) -> str:
    """Load ``folder`` with the package's loader and with ``PeftModel.from_pretrained``; both must keep the contract
    and agree. ``written``: the mutated weights file (None when the weights are the original ones)."""
    try:
        return _load_both_ways(setup, folder, written)
    except BaseException:
        setup.reset()  # a broken contract must not spoil the cases hypothesis tries while shrinking
        raise


def _load_both_ways(setup: AdapterSetup, folder: Path, written: bytes | None) -> str:
    outcomes = []
    dispatch = _dispatches_to_package(folder)
    for by_peft, loader in ((False, setup.load), (True, PeftModel.from_pretrained)):
        if by_peft and dispatch is False:
            continue  # another peft type's config: peft's business, not this package's
        try:
            loaded = loader(setup.model, folder)
        except Exception as error:  # the contract is checked below
            if by_peft and dispatch is None and not isinstance(error, PatcherError):
                outcomes.append(f"refused by peft before it reaches the package: {type(error).__name__}")
            else:
                assert_clear(error, folder)
                outcomes.append(outcome_label(error))
            assert_untouched(setup.model, setup.reference, setup.names)
            continue
        label = accepted(get_peft_model_state_dict(loaded, save_embedding_layers=False), setup.tensors, written)
        if label == HARMLESS and not torch.equal(logits(loaded, inputs_for(loaded)), setup.adapted):
            label = CONFIG_AS_WRITTEN
        outcomes.append(label)
        setup.reset()
    own = outcomes[0]
    assert all(o == own or o.startswith("refused by peft") for o in outcomes), outcomes
    return own if outcomes[-1] == own else f"{own}; PeftModel.from_pretrained: {outcomes[-1]}"


# the weights file renamed to the last word (the folder then lacks it), or replaced by a folder
_FOLDER_MUTATIONS = [
    Mutation(kind, b"")
    for kind in ("weights only as adapter_model.bin", "weights moved to adapter.safetensors", "weights are a folder")
]


def _adapter_file_campaign(make: Callable[[str], AdapterSetup], max_examples: int) -> Counter:
    tally: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        setup = make(tmp)

        @fuzz_settings(max_examples)
        @given(
            mutation=safetensors_mutations(setup.weights)
            | declared_size_mutations(setup.weights)
            | st.sampled_from(_FOLDER_MUTATIONS)
        )
        def case(mutation: Mutation) -> None:
            with tempfile.TemporaryDirectory() as work:
                folder = setup.copy(work)
                if mutation in _FOLDER_MUTATIONS:
                    (folder / WEIGHTS).rename(folder / mutation.kind.split()[-1])
                    if mutation.kind.endswith("a folder"):
                        (folder / WEIGHTS).mkdir()
                else:
                    write_mutation(folder / WEIGHTS, mutation)
                tally[load_adapter_folder(setup, folder, mutation.data)] += 1

        case()
    return tally


def _plausible_values(setup: AdapterSetup) -> st.SearchStrategy[object]:
    """Values of the right type that a careless edit might write: other module names, near numbers, other names."""
    modules = [name for name, _ in setup.fresh().named_modules() if name]
    targets = setup.config["target_modules"]
    return st.one_of(
        st.sampled_from(targets),
        st.just(targets),
        st.sampled_from([f"{name}.weight" for name in targets]).map(lambda name: [name]),
        st.sampled_from(modules),
        st.lists(st.sampled_from(modules), min_size=1, max_size=2, unique=True),
        st.integers(-3, 8),
        st.sampled_from(
            ["gelu", "relu", "silu", "float16", "float64", "bfloat16", "LORA", "DELTA", "PATCHER", "llama"]
        ),
        st.sampled_from([True, False, None, 0.5, 10.0, 1e-300, 1e300]),
    )


def _adapter_config_campaign(make: Callable[[str], AdapterSetup], max_examples: int) -> Counter:
    tally: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        setup = make(tmp)

        @fuzz_settings(max_examples)
        @given(mutation=json_mutations(setup.config, _plausible_values(setup)))
        def case(mutation: Mutation) -> None:
            with tempfile.TemporaryDirectory() as work:
                folder = setup.copy(work)
                (folder / CONFIG).write_bytes(mutation.data)
                tally[load_adapter_folder(setup, folder, None)] += 1

        case()
    return tally


@campaign("adapter file: PATCHER")
def patcher_file(max_examples: int) -> Counter:
    return _adapter_file_campaign(patcher_setup, max_examples)


@campaign("adapter config: PATCHER")
def patcher_config(max_examples: int) -> Counter:
    return _adapter_config_campaign(patcher_setup, max_examples)


@campaign("adapter file: DELTA")
def delta_file(max_examples: int) -> Counter:
    return _adapter_file_campaign(delta_setup, max_examples)


@campaign("adapter config: DELTA")
def delta_config(max_examples: int) -> Counter:
    return _adapter_config_campaign(delta_setup, max_examples)


def _sharing_ffns() -> torch.nn.Module:
    """Seed 1's LLaMA with seed 0's FFNs copied in: every weight the patch set and the delta read is the same."""
    model, original = build("llama", seed=1), build("llama")
    for name in ("model.layers.0.mlp", "model.layers.1.mlp"):
        model.get_submodule(name).load_state_dict(original.get_submodule(name).state_dict())
    return model


def _noisy() -> torch.nn.Module:
    model, g = build("llama"), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.01 * torch.randn(parameter.shape, generator=g))
    return model


@campaign("fingerprint mismatch")
def fingerprint_mismatch(max_examples: int) -> Counter:
    """Another seed's or architecture's base model (also one sharing the adapted layers, or with 1 % noise on every
    weight), or an edited fingerprint (one field, null, or without its whole-model views): refused unless only the
    exact digest changed (the sketch still says "same weights"), a sketch edit stays within tolerance, or the
    whole-model views are gone (checked on what remains, with a warning)."""
    tally: Counter = Counter()
    others = {f"llama seed {s}": (lambda s=s: build("llama", seed=s)) for s in (1, 2)}
    others |= {name: (lambda name=name: build(name)) for name in ("mistral", "qwen2", "gpt2")}
    others |= {"llama seed 1 sharing seed 0's FFNs": _sharing_ffns, "llama with 1 % noise": _noisy}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {"PATCHER": patcher_setup(tmp + "/p"), "DELTA": delta_setup(tmp + "/d")}
        models = {name: make() for name, make in others.items()}

        def edit_field(setup: AdapterSetup) -> st.SearchStrategy[tuple[str, object]]:
            fingerprint = setup.config["fingerprint"]
            digests = st.text("0123456789abcdef", min_size=64, max_size=64)

            def scaled(field_: str) -> st.SearchStrategy[tuple[str, object]]:
                return st.tuples(
                    st.just(field_), st.floats(-0.5, 0.5).map(lambda r: [x * (1 + r) for x in fingerprint[field_]])
                )

            return st.one_of(
                st.tuples(st.sampled_from(sorted(fingerprint)), JSON_VALUES),
                scaled("weights_sketch"),
                scaled("model_sketch"),
                st.tuples(st.sampled_from(["weights_sha256", "model_shapes_sha256"]), digests),
                st.tuples(st.just("fingerprint"), st.sampled_from([None, "without whole-model views"])),
            )

        @fuzz_settings(max_examples)
        @given(data=st.data(), peft_type=st.sampled_from(sorted(setups)))
        def case(data: st.DataObject, peft_type: str) -> None:
            setup = setups[peft_type]
            with tempfile.TemporaryDirectory() as work:
                folder = setup.copy(work)
                if data.draw(st.booleans(), label="other base model"):
                    name = data.draw(st.sampled_from(sorted(models)), label="model")
                    model = models[name]
                    reference = logits(model, inputs_for(model))
                    names = list(model.state_dict())
                    labels = []
                    for loader in (setup.load, PeftModel.from_pretrained):
                        try:
                            loader(model, folder)
                        except PatcherError as error:
                            assert isinstance(error, (FingerprintMismatchError, UnsupportedArchitectureError))
                            assert_untouched(model, reference, names)
                            labels.append(outcome_label(error))
                        else:
                            raise AssertionError(f"a {peft_type} adapter loaded into {name}")
                    assert labels[0] == labels[1], labels
                    tally[labels[0]] += 1
                    return
                key, value = data.draw(edit_field(setup), label="edited field")
                config = json.loads((folder / CONFIG).read_text())
                if key != "fingerprint":
                    config["fingerprint"][key] = value
                elif value is None:
                    config["fingerprint"] = None
                else:
                    for view in ("model_shapes_sha256", "model_sketch"):
                        del config["fingerprint"][view]
                (folder / CONFIG).write_text(json.dumps(config))
                tally[load_adapter_folder(setup, folder, None)] += 1

        case()
    return tally


# ----------------------------------------------------------------------------------------- memory and PMET
def _single_file_campaign(
    max_examples: int, original: bytes, load: Callable[[Path], tuple[dict[str, torch.Tensor], str | None]], name: str
) -> Counter:
    """``load`` returns the tensors read and, when the file's metadata was read differently, a label saying so."""
    tally: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(original)
        expected, _ = load(Path(tmp) / name)

        @fuzz_settings(max_examples)
        @given(mutation=safetensors_mutations(original))
        def case(mutation: Mutation) -> None:
            with tempfile.TemporaryDirectory() as work:
                path = Path(work) / name
                path.write_bytes(mutation.data)
                try:
                    loaded, note = load(path)
                except Exception as error:  # the contract is checked below
                    assert isinstance(error, AdapterFileError) and str(path) in str(error), repr(error)
                    tally[outcome_label(error)] += 1
                    return
                label = accepted(loaded, expected, mutation.data)
                tally[note if note and label == HARMLESS else label] += 1

        case()
    return tally


@campaign("memory bank file")
def memory_bank_file(max_examples: int) -> Counter:
    key = "f" * 64
    with tempfile.TemporaryDirectory() as tmp:
        MemoryBank(torch.randn(20, 32, generator=torch.Generator().manual_seed(0))).save(Path(tmp) / "m.st", key)
        original = (Path(tmp) / "m.st").read_bytes()

    def load(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
        return {"rows": MemoryBank.load(path, key, dim=32).rows()}, None

    return _single_file_campaign(max_examples, original, load, "memory.safetensors")


@campaign("PMET statistics file")
def pmet_statistics_file(max_examples: int) -> Counter:
    key, module = "a" * 64, "model.layers.1.mlp.down_proj"
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 16, generator=g, dtype=torch.float64)
    metadata = {"key": key, "module": module, "tokens": "50"}
    original = save({"mom2": keys.T @ keys / 50}, metadata=metadata)

    def load(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
        moment = covariance._load(path, key, module, 16)
        with safe_open(str(path), framework="pt") as handle:
            assert moment.tokens == int(handle.metadata()["tokens"]) > 0
        return {"mom2": moment.matrix}, None if moment.tokens == 50 else "accepted: token count as written"

    return _single_file_campaign(max_examples, original, load, "mom2.safetensors")


# ------------------------------------------------------------------------------------------ SME checkpoint
@campaign("SME checkpoint")
def sme_checkpoint(max_examples: int) -> Counter:
    """The JSON pointer (fields, names of missing/other/outside files, checksum) and the tensors file it names."""
    tally: Counter = Counter()
    g = torch.Generator().manual_seed(0)
    tensors = {"patch_keys": torch.randn(3, 8, generator=g), "edit_ids": torch.arange(3)}
    state = {"position": 3, "edited": [0, 2], "records": [{"neurons": 1}], "evaluations": [], "base": {}}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, "fold-0", tensors, state)
        pointer = json.loads((Path(tmp) / "fold-0.json").read_text())
        tensor_bytes = (Path(tmp) / pointer["tensors"]).read_bytes()
    file_names = st.sampled_from(
        [
            "fold-0.000009.safetensors",
            "fold-1.000003.safetensors",
            "../fold-0.000003.safetensors",
            "/etc/hostname",
            "fold-0.json",
            "",
            ".",
            "fold-0.000003.safetensors\x00",
            "sub/fold-0.000003.safetensors",
        ]
    )

    @fuzz_settings(max_examples)
    @given(
        target=st.sampled_from(["pointer", "tensors", "tensors with a matching checksum"]),
        pointer_mutation=json_mutations(pointer, file_names | st.text("0123456789abcdef", min_size=64, max_size=64)),
        tensor_mutation=safetensors_mutations(tensor_bytes),
    )
    def case(target: str, pointer_mutation: Mutation, tensor_mutation: Mutation) -> None:
        import hashlib

        with tempfile.TemporaryDirectory() as work:
            directory = Path(work) / "run"
            directory.mkdir()
            (Path(work) / "fold-0.000003.safetensors").write_bytes(tensor_bytes)  # a file outside the folder
            (directory / "fold-1.000003.safetensors").write_bytes(tensor_bytes)  # another checkpoint's file
            pointer_bytes = json.dumps(pointer).encode()
            written = tensor_bytes
            if target == "pointer":
                pointer_bytes = pointer_mutation.data
            else:
                written = tensor_mutation.data
                if target.endswith("checksum"):
                    pointer_bytes = json.dumps({**pointer, "sha256": hashlib.sha256(written).hexdigest()}).encode()
            (directory / pointer["tensors"]).write_bytes(written)
            (directory / "fold-0.json").write_bytes(pointer_bytes)
            try:
                result = load_checkpoint(directory, "fold-0")
            except Exception as error:  # the contract is checked below
                assert isinstance(error, AdapterFileError), repr(error)
                assert str(directory) in str(error), str(error)
                tally[outcome_label(error)] += 1
                return
            assert result is not None
            loaded, loaded_state = result
            label = accepted(loaded, tensors, written)
            if label == AS_WRITTEN:  # only ever with the checksum recomputed to match the new bytes
                label = "accepted: finite tensors as written, under a checksum recomputed to match them"
            if json.dumps(loaded_state) != json.dumps(state):
                assert json.dumps(loaded_state) == json.dumps(json.loads(pointer_bytes)["state"])
                label = "accepted: a changed state loaded as written (the pointer has no checksum)"
            tally[label] += 1

    case()
    return tally


# ------------------------------------------------------------------------------------ patch-set folder entries
PATCH_FILES = (CONFIG, WEIGHTS, EDIT_LOG)
ENTRY_POINTS = ("describe", "undo", "load", "cli info", "cli undo")
READS = {"describe": PATCH_FILES, "load": (CONFIG, WEIGHTS), "cli info": PATCH_FILES}  # what each reader opens
LEFTOVERS = (".tmp", ".staging", ".previous")
SPARSE = "sparse.bin"
DEADLINE_S = 60


class Hang(BaseException):
    """A call still blocked at its deadline: a BaseException, so that no ``except Exception`` turns it into a
    refusal (the CLI reports an ``OSError`` such as ``TimeoutError`` as status 2)."""


class CliRefusal(Exception):
    """The CLI's status 2 with its one error line."""


@contextmanager
def deadline(seconds: int = DEADLINE_S) -> Iterator[None]:
    """Raise :class:`Hang` in a call still running after ``seconds`` (SIGALRM interrupts a blocked ``open``)."""

    def expire(*_: object) -> None:
        raise Hang(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class EntryMutation:
    """One hostile change to a patch set's entries. ``entry``: the patch file replaced, or the extra entry's path
    inside the folder; ``target``: what a link points at (``secret``, ``folder``, ``itself``, ``dangling``, ``copy``
    of the same file outside the folder, or ``.``)."""

    kind: str
    entry: str = ""
    target: str = ""
    absolute: bool = True
    size: int = 0
    secret: bytes = b"SECRET-0"

    @property
    def token(self) -> bytes:
        return self.secret.split(b'"text": "')[-1].split(b'"')[0].strip()


@dataclass
class EntryLayout:
    """A mutated patch set at ``box/adapter``, and beside ``box`` the ``outside`` fixtures its links point at."""

    folder: Path
    outside: Path
    links: dict[Path, str] = field(default_factory=dict)
    fifos: list[Path] = field(default_factory=list)

    @property
    def read_through_link(self) -> set[str]:
        """The patch files a reader reaches through a link (all of them when the folder is one)."""
        if self.folder.is_symlink():
            return set(PATCH_FILES)
        return {name for name in PATCH_FILES if (self.folder / name).is_symlink()}


@dataclass
class PatchSetSetup:
    """A saved PATCHER patch set with an edit log (edits 1-4), and what each entry point gives on it untouched."""

    adapter: AdapterSetup
    results: dict[str, object] = field(default_factory=dict)


def _entry_mutations() -> st.SearchStrategy[EntryMutation]:
    """Links replacing a patch file or added (at the top or in a subfolder), FIFOs likewise, the folder itself a
    link, a link as its lock file, and a sparse extra file of 1–256 MiB; the secret is plain text or an edit-log
    line, so a reader following a link into it would accept it."""
    token = st.text("0123456789abcdef", min_size=16, max_size=32).map(lambda t: f"SECRET-{t}")
    secret = st.builds(
        lambda t, as_log: (
            json.dumps({"edit_id": 1, "text": t, "target": "x"}) + "\n" if as_log else f'"text": "{t}"\n'
        ).encode(),
        token,
        st.booleans(),
    )
    extra = st.builds(
        lambda where, name: where + "extra-" + name,
        st.sampled_from(["", "notes/"]),
        st.text("ab-_", min_size=1, max_size=6),
    )
    patch_file = st.sampled_from(PATCH_FILES)
    return st.one_of(
        st.builds(
            EntryMutation,
            st.just("link replaces a patch file"),
            patch_file,
            st.sampled_from(["secret", "folder", "itself", "dangling", "copy"]),
            st.booleans(),
            secret=secret,
        ),
        st.builds(
            EntryMutation,
            st.just("extra link"),
            extra,
            st.sampled_from(["secret", "folder", ".", "dangling"]),
            st.booleans(),
            secret=secret,
        ),
        st.builds(EntryMutation, st.just("FIFO replaces a patch file"), patch_file, secret=secret),
        st.builds(EntryMutation, st.just("extra FIFO"), extra, secret=secret),
        st.builds(EntryMutation, st.just("folder is a link"), target=st.just("copy"), absolute=st.booleans()),
        st.builds(
            EntryMutation,
            st.just("lock file is a link"),
            target=st.sampled_from(["secret", "folder", "itself", "dangling"]),
            absolute=st.booleans(),
            secret=secret,
        ),
        st.builds(
            EntryMutation,
            st.just("sparse extra file"),
            st.sampled_from(["", "notes/"]).map(lambda where: where + SPARSE),
            size=st.integers(2**20, 2**28),
        ),
    )


def _lay_out(setup: PatchSetSetup, work: Path, mutation: EntryMutation) -> EntryLayout:
    outside, box = work / "outside", work / "box"
    shutil.copytree(setup.adapter.folder, outside / "real")
    (outside / "secret.txt").write_bytes(mutation.secret)
    (outside / "tree" / "deep").mkdir(parents=True)
    (outside / "tree" / "deep" / "file").write_text("x")
    box.mkdir()
    layout = EntryLayout(box / "adapter", outside)

    def link(path: Path, role: str) -> None:
        copy = "real" if path == layout.folder else f"real/{path.name}"
        fixture = {"secret": "secret.txt", "folder": "tree", "dangling": "missing", "copy": copy}
        if role in fixture:
            target = outside / fixture[role]
            text = str(target) if mutation.absolute else os.path.relpath(target, path.parent)
        else:
            text = path.name if role == "itself" else role
        path.symlink_to(text)
        layout.links[path] = text

    if mutation.kind == "folder is a link":
        link(layout.folder, "copy")
        return layout
    shutil.copytree(setup.adapter.folder, layout.folder)
    path = layout.folder / mutation.entry
    path.parent.mkdir(exist_ok=True)
    if mutation.kind == "lock file is a link":
        link(box / ".adapter.lock", mutation.target)
    elif mutation.kind.startswith("sparse"):
        with open(path, "wb") as handle:
            handle.truncate(mutation.size)
    else:
        path.unlink(missing_ok=True)
        if "FIFO" in mutation.kind:
            os.mkfifo(path)
            layout.fifos.append(path)
        else:
            link(path, mutation.target)
    return layout


def _tree(root: Path) -> dict[str, object]:
    """Every entry under ``root`` by ``lstat``, never following a link: a file's bytes (a sparse one's size), a
    link's target, or the kind of anything else."""
    entries: dict[str, object] = {}
    pending = [root]
    while pending:
        for path in sorted(pending.pop().iterdir()):
            mode = os.lstat(path).st_mode
            key = str(path.relative_to(root))
            if stat.S_ISDIR(mode):
                entries[key] = "folder"
                pending.append(path)
            elif stat.S_ISLNK(mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                entries[key] = path.stat().st_size if path.name == SPARSE else path.read_bytes()
            else:
                entries[key] = stat.S_IFMT(mode)
    return entries


def _state(layout: EntryLayout) -> dict[str, dict[str, object]]:
    """The folder's entries (none of its own when it is a link) and the fixtures' (the real set among them)."""
    folder = {} if layout.folder.is_symlink() else _tree(layout.folder)
    return {"folder": folder, "outside": _tree(layout.outside)}


def _without_path(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "path"}


def _enter(entry: str, setup: PatchSetSetup, folder: Path) -> object:
    """Run ``entry`` on ``folder`` under a deadline: its result, or the package's error (:class:`CliRefusal` for the
    CLI's status 2); anything else raised breaks the contract."""
    with deadline():
        if entry == "describe":
            return _without_path(describe_patch_set(folder).to_dict())
        if entry == "undo":
            return remove_edit_from_files(folder, 1)
        if entry == "load":
            return PatcherModel.from_pretrained(setup.adapter.model, folder)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = main(["info", str(folder)] if entry == "cli info" else ["undo", str(folder), "1"])
    if status == 2:
        assert "transformer-patcher: error: " in err.getvalue(), err.getvalue()
        raise CliRefusal(err.getvalue().strip().splitlines()[-1])
    assert status == 0, status
    return out.getvalue().replace(str(folder), "<folder>")


def _check_success(entry: str, setup: PatchSetSetup, layout: EntryLayout, result: object) -> str:
    """Check what ``entry`` gave on a folder it accepted; return "read", or "read through a link" when it gave what
    a link (or links) inside or as the folder points at."""
    through = layout.read_through_link & set(READS.get(entry, ()))
    expected = setup.results.get(entry)
    if entry == "load":
        assert isinstance(result, PeftModel)
        assert torch.equal(logits(result, inputs_for(result)), setup.adapter.adapted)
        setup.adapter.reset()
    elif entry in ("undo", "cli undo"):
        assert not layout.links and not layout.fifos, "a writer accepted a folder holding links or FIFOs"
        assert result == expected, (result, expected)
        assert _without_path(describe_patch_set(layout.folder).to_dict()) == setup.results["undone"]
        return "wrote"
    elif result != expected:  # only the edit log may differ, when it is read through a link
        assert EDIT_LOG in through, f"{entry} read the folder differently:\n{result}\n{expected}"
        if entry == "describe":
            assert isinstance(result, dict) and isinstance(expected, dict)
            assert {k: v for k, v in result.items() if k != "edits"} == {
                k: v for k, v in expected.items() if k != "edits"
            }
        else:
            assert isinstance(result, str) and isinstance(expected, str)
            assert result.split("\n\n")[0] == expected.split("\n\n")[0]
    return "read through a link" if through else "read"


def _check_invariants(layout: EntryLayout, mutation: EntryMutation, before: dict[str, Any], wrote: bool) -> None:
    """Every link and FIFO as it was, no leftover beside or inside the folder, nothing of the secret inside it,
    nothing outside it changed, and nothing in it unless ``wrote``."""
    for path, target in layout.links.items():
        assert path.is_symlink() and os.readlink(path) == target, f"{path} is no longer the link to {target}"
    for path in layout.fifos:
        assert stat.S_ISFIFO(os.lstat(path).st_mode), f"{path} is no longer a FIFO"
    assert {p.name for p in layout.folder.parent.iterdir()} <= {"adapter", ".adapter.lock"}
    after = _state(layout)
    assert after["outside"] == before["outside"], "something outside the folder changed (the real set, the secret)"
    for key, value in after["folder"].items():
        assert not key.endswith(LEFTOVERS), f"{layout.folder / key} was left behind"
        assert not isinstance(value, bytes) or mutation.token not in value, f"the secret is in {layout.folder / key}"
    if not wrote:
        assert after["folder"] == before["folder"], "a reader or a refused writer changed the folder"


def folder_entry_case(setup: PatchSetSetup, mutation: EntryMutation) -> str:
    outcomes: dict[str, str] = {}
    for entry in ENTRY_POINTS:
        with tempfile.TemporaryDirectory() as work:
            layout = _lay_out(setup, Path(work), mutation)
            before = _state(layout)
            try:
                result = _enter(entry, setup, layout.folder)
            except Exception as error:  # the contract is checked below
                assert isinstance(error, (PatcherError, CliRefusal)), f"{entry}: {type(error).__name__}: {error}"
                if entry == "load":
                    assert_untouched(setup.adapter.model, setup.adapter.reference, setup.adapter.names)
                outcomes[entry] = "refused (status 2)" if isinstance(error, CliRefusal) else outcome_label(error)
                _check_invariants(layout, mutation, before, wrote=False)
                continue
            outcomes[entry] = _check_success(entry, setup, layout, result)
            if outcomes[entry] == "wrote" and mutation.kind.startswith("sparse"):
                carried = next(layout.folder.rglob(SPARSE)).stat()
                if carried.st_blocks * 512 >= carried.st_size // 2:
                    outcomes[entry] = "wrote (the sparse file carried over dense)"
            _check_invariants(layout, mutation, before, wrote=outcomes[entry].startswith("wrote"))
    return _entry_label(outcomes)


def _entry_label(outcomes: dict[str, str]) -> str:
    """``refused`` by every entry point, ``accepted ... as written`` when a reader followed a link, else harmless;
    then which entry points did what."""
    groups: dict[str, list[str]] = {}
    for entry, outcome in outcomes.items():
        groups.setdefault(outcome, []).append(entry)
    details = "; ".join(f"{'/'.join(entries)} {outcome}" for outcome, entries in groups.items())
    if all(o.startswith("refused") for o in outcomes.values()):
        return f"refused: by every entry point ({details})"
    if "read through a link" in outcomes.values():
        return f"accepted: read through a link, as written ({details})"
    return f"harmless: ({details})"


def patch_set_setup(tmp: str) -> PatchSetSetup:
    """The PATCHER adapter-file campaign's patch set plus an edit log, and each entry point's result on it."""
    adapter = patcher_setup(tmp)
    write_edit_log(adapter.folder, [edit_log_entry(i, f"fact {i}", "answer", True) for i in (1, 2, 3, 4)])
    setup = PatchSetSetup(adapter)
    for entry in ("describe", "cli info", "cli undo", "undo"):  # a load gives ``adapter.adapted``
        with tempfile.TemporaryDirectory() as work:
            folder = adapter.copy(work)
            setup.results[entry] = _enter(entry, setup, folder)
            setup.results["undone"] = _without_path(describe_patch_set(folder).to_dict())
    return setup


@campaign("patch folder entries")
def patch_folder_entries(max_examples: int) -> Counter:
    """Links (to a secret file, a folder, themselves, nowhere, a copy outside), FIFOs and a sparse extra file in or
    as a saved patch set, or as its lock file, through ``describe_patch_set``, ``remove_edit_from_files``,
    ``PatcherModel.from_pretrained`` and the CLI's ``info`` and ``undo``: no hang, the package's error or the
    original set (or what a link names, for a reader), and no link, FIFO or secret ever written into the folder."""
    tally: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        setup = patch_set_setup(tmp)

        @fuzz_settings(max_examples)
        @given(mutation=_entry_mutations())
        def case(mutation: EntryMutation) -> None:
            try:
                tally[folder_entry_case(setup, mutation)] += 1
            except BaseException:
                setup.adapter.reset()  # a broken contract must not spoil the cases hypothesis tries while shrinking
                raise

        case()
    return tally
