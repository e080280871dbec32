"""The ``README.md`` model card of a patch-set folder: what a reader on the Hub (or in the folder) needs to know.

peft writes an empty template ("[More Information Needed]"). A patch set can say much more: the base model, every
edit with its id, text, target and what was measured after it, the patched module, and how to load it with this
package or with plain peft. The Hub metadata (``library_name``, ``base_model``, ``tags``) makes it findable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from transformer_patcher.core.pretrained import UPSTREAM
from transformer_patcher.core.wording import count
from transformer_patcher.tuners.adapter_file import config_targets

CARD_NAME = "README.md"
TAGS = ("transformer-patcher", "model-editing", "peft", "patcher")


def _package_version() -> str:
    try:
        return version("transformer-patcher")
    except PackageNotFoundError:
        return "unknown"


def _cell(value: Any, limit: int = 80) -> str:
    """Markdown table cell: one line, ``|`` escaped, long text cut."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _checks(entry: dict[str, Any], part: str) -> str:
    results = entry.get("checks", {}).get(part)
    if not results:
        return ""
    return f"{sum(bool(v) for v in results.values())}/{len(results)}"


def model_card(config: Any, entries: Sequence[dict[str, Any]]) -> str:
    """The card of an adapter folder with ``config`` (a ``PatcherConfig`` or ``DeltaConfig``) and its edit log."""
    base = config.base_model_name_or_path or "(a model built from its config: no name recorded)"
    where = f"on `{', '.join(map(str, config_targets(config)))}`"
    hub_base = UPSTREAM.get(base) or (base if _looks_like_hub_id(base) else None)
    header = ["---", "library_name: peft"]
    if hub_base:
        header.append(f"base_model: {json.dumps(hub_base)}")
    header += ["tags:", *(f"- {tag}" for tag in TAGS), "---", ""]
    fixed = sum(bool(e.get("success")) for e in entries)
    if str(config.peft_type) == "DELTA":
        title = f"{config.method.upper()} weight delta for `{base}`"
        what = f"a low-rank weight delta of total rank {config.rank} {where}: `W' = W + up @ down`."
    else:
        title = f"Transformer-Patcher patch set for `{base}`"
        what = (
            f"{count(config.num_patches, 'patch neuron')} {where} ({config.patch_activation}). Each adds "
            "`act(q·k + b)·v` to that FFN's output and stays silent (below its threshold) on other inputs."
        )
    lines = [
        f"# {title}",
        "",
        f"Made with transformer-patcher {_package_version()}: {count(len(entries), 'edit')} ({fixed} fixed), {what}",
        "",
        "## Edits",
        "",
    ]
    if entries:
        lines += [
            "| edit id | format | text | target | fixed | rephrases kept | locality kept |",
            "|---:|---|---|---|---|---|---|",
        ]
        for e in entries:
            fmt = (e.get("prompt_format") or {}).get("template", "raw")
            lines.append(
                f"| {e['edit_id']} | {_cell(fmt, 20)} | {_cell(e.get('text', ''))} | {_cell(e.get('target', ''))} "
                f"| {'yes' if e.get('success') else 'no'} | {_checks(e, 'rephrases')} | {_checks(e, 'locality')} |"
            )
    else:
        lines.append("No edit log: the patches were written without one.")
    lines += ["", "## Load it", ""]
    if str(config.peft_type) != "DELTA":
        lines += [
            "```python",
            "from transformer_patcher import Patcher",
            "",
            f'fixer = Patcher.from_pretrained({json.dumps(base)}, patches="path/to/this/folder")',
            "```",
            "",
            "or with plain peft:",
            "",
        ]
    lines += [
        "```python",
        f"import transformer_patcher  # registers the {config.peft_type} adapter type with peft",
        "from peft import PeftModel",
        "from transformer_patcher.core.pretrained import load_model, model_kind",
        "",
        f"name = {json.dumps(base)}",
        "base, tokenizer = load_model(name, model_kind(name))",
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        "transformers' `base.load_adapter(folder)` works too. Loading checks the base model's fingerprint "
        "(`adapter_config.json`) and refuses another model.",
        "",
    ]
    return "\n".join(header + lines)


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with no path syntax: what the Hub's ``base_model`` field accepts."""
    parts = name.split("/")
    plain = all(p and not p.startswith(".") and "\\" not in p for p in parts)
    return len(parts) == 2 and plain and not os.path.exists(name)
