"""Every file the package reads, fuzzed: a few cases of each campaign in ``fuzz_files`` on every run, plus
regressions for the loader bugs the campaigns found."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import fuzz_files
from fuzz_files import (
    CONFIG,
    EDIT_LOG,
    WEIGHTS,
    AdapterSetup,
    EntryMutation,
    PatchSetSetup,
    declared_huge,
    delta_setup,
    folder_entry_case,
    load_adapter_folder,
    patch_set_setup,
    patcher_setup,
    write_mutation,
)
from fuzzing import CAMPAIGNS
from transformer_patcher import AdapterFileError
from transformer_patcher.experiments.sme.run_state import load_checkpoint, save_checkpoint
from transformer_patcher.methods.patcher.memory import MemoryBank
from transformer_patcher.methods.pmet import covariance

FILE_CAMPAIGNS = [name for name, function in CAMPAIGNS.items() if function.__module__ == fuzz_files.__name__]
CASES = 30


@pytest.mark.parametrize("name", FILE_CAMPAIGNS)
def test_campaign(name: str) -> None:
    tally = CAMPAIGNS[name](CASES)
    assert sum(tally.values()) >= CASES - 2  # hypothesis may stop a case or two short on an exhausted strategy


# --------------------------------------------------------------------------------------------- regressions
SETUPS = {"PATCHER": patcher_setup, "DELTA": delta_setup}


def _folder(make: Callable[[str], AdapterSetup], tmp_path: Path) -> tuple[AdapterSetup, Path]:
    setup = make(str(tmp_path / "setup"))
    return setup, setup.copy(str(tmp_path / "work"))


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config))


def _declare_huge(folder: Path) -> None:
    """A consistent file whose first tensor declares 2**28 rows (1 GB or more, a sparse tail)."""
    data = (folder / WEIGHTS).read_bytes()
    name = min(load_file(folder / WEIGHTS))
    write_mutation(folder / WEIGHTS, declared_huge(data, name, [2**28, *load_file(folder / WEIGHTS)[name].shape[1:]]))


def _narrow_weights(folder: Path) -> None:
    """Drop the last output column of every patch / the last input column of every delta: consistent in itself."""
    tensors = load_file(folder / WEIGHTS)
    for key, tensor in tensors.items():
        if key.endswith(("patch_frozen_values", "patch_values", "patch_value_scale", "delta_down")):
            tensors[key] = tensor[:, :-1].contiguous()
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


REFUSALS: dict[str, Callable[[Path], None]] = {
    # injected, then refused by peft's state-dict hook: the model kept its tuner layers
    "no fingerprint and weights of other dims": lambda f: (
        _edit_config(f, lambda c: c.update(fingerprint=None)),
        _narrow_weights(f),
    ),
    "modules_to_save set": lambda f: _edit_config(f, lambda c: c.update(modules_to_save=["model"])),
    "exclude_modules names the target": lambda f: _edit_config(
        f, lambda c: c.update(exclude_modules=c["target_modules"])
    ),
    "target_parameters set": lambda f: _edit_config(f, lambda c: c.update(target_parameters=["lm_head.weight"])),
    "weights file missing": lambda f: (f / WEIGHTS).unlink(),
    # raw RecursionError, RuntimeError, OverflowError, NotImplementedError
    "deeply nested config": lambda f: (f / CONFIG).write_text(
        (f / CONFIG).read_text().rstrip()[:-1] + ', "y": ' + "[" * 5000 + "]" * 5000 + "}"
    ),
    "config nested 40 levels": lambda f: _edit_config(
        f, lambda c: c.update(auto_mapping={"a": json.loads("[" * 40 + "]" * 40)})
    ),
    "base_model_name_or_path not a string": lambda f: _edit_config(f, lambda c: c.update(base_model_name_or_path=True)),
    "float8 tensors": lambda f: save_file(
        {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in load_file(f / WEIGHTS).items()},
        f / WEIGHTS,
    ),
    "float64 tensors for a float32 config": lambda f: save_file(
        {k: v.double() if v.is_floating_point() else v for k, v in load_file(f / WEIGHTS).items()}, f / WEIGHTS
    ),
    # finite, so once loaded: every logit NaN
    "finite but absurd magnitudes": lambda f: save_file(
        {k: v * 1e30 if v.is_floating_point() else v for k, v in load_file(f / WEIGHTS).items()}, f / WEIGHTS
    ),
    # read whole before any check: 24 s and 4.7 GB RSS for 1.6 GB
    "a consistent header declaring gigabytes": _declare_huge,
}
MISMATCHES: dict[str, Callable[[Path], None]] = {
    "sketch of 3 numbers": lambda f: _edit_config(
        f, lambda c: c["fingerprint"].update(weights_sketch=[1.0, 2.0, 3.0], weights_sha256="0")
    ),
    "sketch of huge integers": lambda f: _edit_config(
        f, lambda c: c["fingerprint"].update(weights_sketch=[10**400] * 16, weights_sha256="0")
    ),
    # the adapted layers' views alone accepted another model sharing them, or 1 % noise on every weight
    "whole-model sketch moved 1 %": lambda f: _edit_config(
        f, lambda c: c["fingerprint"].update(model_sketch=[x * 1.01 for x in c["fingerprint"]["model_sketch"]])
    ),
    "whole-model shapes differ": lambda f: _edit_config(f, lambda c: c["fingerprint"].update(model_shapes_sha256="0")),
}
UNVERIFIED: dict[str, Callable[[Path], None]] = {
    # was applied silently, and its save then recorded the new model's fingerprint
    "fingerprint null": lambda f: _edit_config(f, lambda c: c.update(fingerprint=None)),
}
EXPECTED = (
    {name: "AdapterFileError" for name in REFUSALS}
    | {name: "FingerprintMismatchError" for name in MISMATCHES}
    | {name: "UnverifiedAdapterError" for name in UNVERIFIED}
)


@pytest.mark.parametrize("peft_type", sorted(SETUPS))
@pytest.mark.parametrize("mutation", sorted(EXPECTED))
def test_bad_adapter_folder_is_refused_before_the_model_changes(peft_type: str, mutation: str, tmp_path: Path) -> None:
    setup, folder = _folder(SETUPS[peft_type], tmp_path)
    {**REFUSALS, **MISMATCHES, **UNVERIFIED}[mutation](folder)
    assert load_adapter_folder(setup, folder, None).startswith(
        f"refused: {EXPECTED[mutation]}"
    )  # also checks untouched


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (torch.full((4, 32), float("nan")), "NaN or inf"),  # was a ValueError not naming the file
        (torch.zeros(32), "must hold float32/bfloat16 rows"),
        (torch.ones(4, 32, dtype=torch.int8), "must hold float32/bfloat16 rows"),
        (torch.zeros(4, 31), r"rows of shape \(n, 32\)"),
    ],
)
def test_bad_memory_file_is_refused(rows: torch.Tensor, match: str, tmp_path: Path) -> None:
    path = tmp_path / "memory.safetensors"
    path.write_bytes(save({"rows": rows}, metadata={"key": "k"}))
    with pytest.raises(AdapterFileError, match=match) as caught:
        MemoryBank.load(path, "k", dim=32)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("matrix", "tokens", "match"),
    [
        (torch.eye(4, dtype=torch.float64), "many", "token count 'many'"),  # was a ValueError from int()
        (torch.eye(4, dtype=torch.float64), "-3", "token count '-3'"),
        (torch.full((4, 4), float("inf"), dtype=torch.float64), "9", "NaN or inf"),
        (torch.eye(3, dtype=torch.float64), "9", "3-wide matrix; the keys are 4-wide"),
    ],
)
def test_bad_statistics_file_is_refused(matrix: torch.Tensor, tokens: str, match: str, tmp_path: Path) -> None:
    path = tmp_path / "mom2.safetensors"
    path.write_bytes(save({"mom2": matrix}, metadata={"key": "k", "module": "m", "tokens": tokens}))
    with pytest.raises(AdapterFileError, match=match):
        covariance._load(path, "k", "m", 4)


@pytest.mark.parametrize(
    ("pointer", "match"),
    [
        (b'{"format": 1, "tensors": "fold-0.\xff"}', "cannot resume"),  # UnicodeDecodeError
        (b'{"format": 1, "tensors": "fold-0.000001.safetensors\\u0000", "sha256": "", "state": {}}', "not a tensors"),
        (b'{"format": 1, "tensors": "../fold-0.000001.safetensors", "sha256": "", "state": {}}', "not a tensors"),
        (b'{"format": 1, "tensors": "/etc/hostname", "sha256": "", "state": {}}', "not a tensors"),
        (b"[1]", "unsupported checkpoint format 'list'"),
        (b"[" * 100_000, "cannot resume"),  # RecursionError
        (b'{"format": 1, "tensors": "fold-0.000001.safetensors", "sha256": "", "state": []}', "state object"),
    ],
)
def test_bad_checkpoint_pointer_is_refused(pointer: bytes, match: str, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "run", "fold-0", {"x": torch.zeros(2)}, {"position": 1})
    (tmp_path / "fold-0.000001.safetensors").write_bytes((tmp_path / "run" / "fold-0.000001.safetensors").read_bytes())
    (tmp_path / "run" / "fold-0.json").write_bytes(pointer)
    with pytest.raises(AdapterFileError, match=match):
        load_checkpoint(tmp_path / "run", "fold-0")


def test_checkpoint_with_non_finite_tensors_is_refused_even_with_a_matching_checksum(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "fold-0", {"x": torch.tensor([1.0, float("nan")])}, {"position": 1})
    with pytest.raises(AdapterFileError, match=r"tensors \['x'\] hold NaN or inf"):
        load_checkpoint(tmp_path, "fold-0")


# ------------------------------------------------------------------------------------- patch-set folder entries
@pytest.fixture(scope="module")
def patch_set(tmp_path_factory: pytest.TempPathFactory) -> PatchSetSetup:
    return patch_set_setup(str(tmp_path_factory.mktemp("patch_set")))


LOG_SECRET = json.dumps({"edit_id": 1, "text": "SECRET-0123456789abcdef", "target": "x"}).encode() + b"\n"
ENTRY_CASES: dict[str, tuple[EntryMutation, str]] = {  # one of each kind, whatever hypothesis draws
    "config links to a secret file": (EntryMutation("link replaces a patch file", CONFIG, "secret"), "refused"),
    "weights link to themselves": (EntryMutation("link replaces a patch file", WEIGHTS, "itself"), "refused"),
    "weights link to a copy outside": (
        EntryMutation("link replaces a patch file", WEIGHTS, "copy", absolute=False),
        "accepted: read through a link",
    ),
    "edit log links to a secret log line": (
        EntryMutation("link replaces a patch file", EDIT_LOG, "secret", secret=LOG_SECRET),
        "accepted: read through a link",
    ),
    "loop -> . in a subfolder": (EntryMutation("extra link", "notes/loop", "."), "harmless"),
    "config is a FIFO": (EntryMutation("FIFO replaces a patch file", CONFIG), "refused"),
    "extra FIFO": (EntryMutation("extra FIFO", "pipe"), "harmless"),
    "folder is a link": (EntryMutation("folder is a link", target="copy"), "accepted: read through a link"),
    "lock file links to a secret file": (EntryMutation("lock file is a link", target="secret"), "harmless"),
    "sparse extra file": (EntryMutation("sparse extra file", "sparse.bin", size=2**24), "harmless"),
}


@pytest.mark.parametrize("name", sorted(ENTRY_CASES))
def test_patch_folder_entry_keeps_the_contract(patch_set: PatchSetSetup, name: str) -> None:
    mutation, expected = ENTRY_CASES[name]
    assert folder_entry_case(patch_set, mutation).startswith(expected)


def test_an_edit_log_linking_to_itself_is_refused_with_the_package_error(patch_set: PatchSetSetup) -> None:
    folder_entry_case(patch_set, EntryMutation("link replaces a patch file", EDIT_LOG, "itself"))
