"""``info PATCH_DIR``: what a saved patch set (or PMET/MEMIT weight delta) holds, read from its files only.

Light on purpose: a patch set that :mod:`.patch_folder` can vouch for is described without importing torch, peft or
transformers. Any other folder (a weight delta, or anything unusual or wrong) goes to the library's full readers,
loaded by name here, which describe it or refuse it with their own error.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from transformer_patcher.cli.output import md_head, md_row, one_line
from transformer_patcher.cli.patch_folder import CONFIG_NAME, describe_patch_folder
from transformer_patcher.core.atomic import open_regular_file, recover_folder
from transformer_patcher.core.wording import count

PATCH_SET_READER = "transformer_patcher.tuners.patcher.patch_set"  # describe_patch_set: the full reader
DELTA_READER = "transformer_patcher.tuners.delta.delta_set"  # describe_delta


def setup(info: argparse.ArgumentParser) -> None:
    info.add_argument("patches", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=show_info)


def show_info(args: argparse.Namespace) -> int:
    if peft_type(args.patches) == "DELTA":
        return _show_delta(args)
    info = describe_patch_folder(args.patches) or _describe_patch_set(args.patches)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"patch set   {one_line(info['path'])}")
    print(f"base model  {one_line(info['base_model'])}")
    on = f"{one_line(info['target_module'])} ({one_line(info['activation'])})"
    print(f"patches     {count(info['num_patches'], 'neuron')} on {on}")
    print(f"file        {info['file_bytes']:,} bytes of safetensors\n")
    print(md_head(["edit id", "neurons", "text", "target"], "rrll"))
    for edit in info["edits"]:
        print(md_row([edit["edit_id"], edit["neurons"], edit.get("text", ""), edit.get("target", "")]))
    return 0


def _describe_patch_set(folder: Path) -> dict[str, Any]:
    """The full reader (torch and peft): for a folder :func:`describe_patch_folder` left to it."""
    return importlib.import_module(PATCH_SET_READER).describe_patch_set(folder).to_dict()


def peft_type(folder: Path) -> str | None:
    """The ``peft_type`` an adapter folder declares (None when unreadable: the full loader then says why)."""
    try:
        recover_folder(folder)
        with open_regular_file(folder / CONFIG_NAME) as handle:  # a FIFO would block a plain read
            return json.load(handle).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def _show_delta(args: argparse.Namespace) -> int:
    info = importlib.import_module(DELTA_READER).describe_delta(args.patches)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"weight delta {one_line(info['path'])}")
    print(f"base model   {one_line(info['base_model'])}")
    modules = count(len(info["modules"]), "module")
    print(f"method       {one_line(info['method'])}, total rank {one_line(info['rank'])} over {modules}")
    print(f"file         {info['file_bytes']:,} bytes of safetensors\n")
    print(md_head(["module", "rank", "in", "out"], "lrrr"))
    for name, shape in info["modules"].items():
        print(md_row([name, shape["rank"], shape["in"], shape["out"]]))
    if info["edits"]:
        print("\n" + md_head(["edit id", "text", "target"], "rll"))
        for edit in info["edits"]:
            print(md_row([edit["edit_id"], edit.get("text", ""), edit.get("target", "")]))
    return 0
