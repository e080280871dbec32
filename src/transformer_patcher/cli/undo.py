"""``undo PATCH_DIR EDIT_ID``: take one edit's neurons (and its edit-log line) out of a saved patch set."""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer_patcher.cli.info import peft_type
from transformer_patcher.cli.options import edit_id
from transformer_patcher.cli.output import one_line
from transformer_patcher.core.wording import count
from transformer_patcher.tuners.patcher.patch_set import remove_edit_from_files


def setup(undo: argparse.ArgumentParser) -> None:
    undo.add_argument("patches", type=Path)
    undo.add_argument("edit_id", type=edit_id)
    undo.set_defaults(handler=undo_edit)


def undo_edit(args: argparse.Namespace) -> int:
    if peft_type(args.patches) == "DELTA":
        raise ValueError(
            f"{args.patches} is a PMET/MEMIT weight delta: each batch's update was solved against the model with the "
            "earlier ones applied, so one edit cannot be taken out on its own; re-run the edits without it"
        )
    removed = remove_edit_from_files(args.patches, args.edit_id)
    print(f"removed edit {args.edit_id} ({count(removed, 'neuron')}) from {one_line(args.patches)}/")
    return 0
