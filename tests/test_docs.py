"""Every Python code block of README.md and docs/ runs.

A page's blocks run in order in one fresh process (later blocks use what earlier ones built, as a reader would), in
an empty working folder, offline. By default the real models a block names are replaced by tiny stand-ins
(``tests/docs_models.py``); ``TRANSFORMER_PATCHER_DOCS_MODELS=real`` or the slow-marked variant runs them on the
real models.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from docs_models import build_docs_models, prelude

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


PAGES_WITH_CODE = [page for page in PAGES if blocks(page)]


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_docs_models(tmp_path_factory.mktemp("docs-models"))


def run_page(page: Path, workdir: Path, setup: str, own_cache: bool = True) -> None:
    """Run the page's blocks after ``setup``; ``own_cache``: a fresh cache folder (the real models keep the user's,
    where their converted weights and memories already are)."""
    source = setup + "\n".join(f"# --- block {i}\n{code}" for i, code in enumerate(blocks(page)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if own_cache:
        env["TRANSFORMER_PATCHER_CACHE"] = str(workdir / "cache")
    done = subprocess.run(
        [sys.executable, "-c", source], cwd=workdir, capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stderr[-4000:]}"


def test_the_docs_have_code_blocks() -> None:
    assert {p.name for p in PAGES_WITH_CODE} >= {"README.md", "quickstart.md", "editing.md", "adapter.md"}


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.name)
def test_code_blocks_run(page: Path, standins: dict[str, str], tmp_path: Path) -> None:
    real = os.environ.get("TRANSFORMER_PATCHER_DOCS_MODELS") == "real"
    run_page(page, tmp_path, "" if real else prelude(standins), own_cache=not real)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.name)
def test_code_blocks_run_on_the_real_models(page: Path, tmp_path: Path) -> None:
    run_page(page, tmp_path, "", own_cache=False)
