"""The package's one-way layers (docs/architecture.md), checked on the source text of every module.

Three rules, read off the AST (nothing is imported, so a broken module still gets a clear message):

* every import of a package module points to the same or a lower layer, and never across independent siblings;
* no package import hides in a function, method or class body (module level and ``if TYPE_CHECKING:`` are fine;
  the top layer may still load modules by name through ``importlib`` for its lazy attributes and subcommands);
* the module-level import graph has no cycles.

``make lint`` checks the same layers with import-linter (``[tool.importlinter]`` in pyproject.toml), which also
follows indirect chains; this file adds the in-function and cycle rules, names the file and line, and runs
``lint-imports`` too when it is installed, so ``make test`` (CI) enforces both.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

PACKAGE = "transformer_patcher"
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / PACKAGE

# Layer of each top folder (or top module); "" is the package's own __init__. Imports point to the same or a lower
# layer. A new top folder must be placed here (and in pyproject.toml's layers contract) before it is used.
LAYERS: dict[str, int] = {
    "core": 0,
    "metrics": 0,
    "tuners": 1,
    "data": 1,
    "methods": 2,
    "experiments": 3,
    "cli": 4,
    "__main__": 4,
    "": 4,
}
LAYER_NAMES = {0: "core | metrics", 1: "tuners | data", 2: "methods", 3: "experiments", 4: "cli"}
# Top folders of one layer that must not import each other.
INDEPENDENT_TOPS = [{"core", "metrics"}, {"tuners", "data"}]
# Folders whose subpackages (or modules) are independent siblings. The folder's other modules, its __init__
# included, are shared by the siblings and sit below them: they import none of them.
SIBLINGS: dict[str, frozenset[str]] = {
    "tuners": frozenset({"patcher", "delta"}),
    "methods": frozenset({"patcher", "pmet", "baselines"}),
}
# Only these may load package modules by name (importlib) inside functions: lazy attributes and lazy subcommands.
LAZY_LOADERS = {"", "cli", "__main__"}
# Modules below the top that load a module whose name is computed, and why: never one of this package's.
COMPUTED_LOADS = {f"{PACKAGE}.core.pretrained": "the PyPI package a short model name comes in (its folder's name)"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    text: str
    where: str  # "module", "type-checking", "function" or "lazy" (importlib in a function)
    via: str | None = None  # for an implicit import of a package: the submodule the statement names


@dataclass(frozen=True)
class Module:
    name: str
    path: str
    source: str
    is_package: bool


def package_modules(src: Path = SRC) -> dict[str, Module]:
    modules = {}
    for path in sorted(src.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(src).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        modules[name] = Module(name, str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"), is_package)
    return modules


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, where: str = "module") -> Iterator[tuple[ast.AST, str]]:
    """Every node below ``node`` with where it runs: at import time, only for type checkers, or on a later call."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            inner = "function"
        elif isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body and where == "module":
            inner = "type-checking"
        else:
            inner = where
        yield child, inner
        yield from _walk(child, inner)


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _literal_name(call: ast.Call, module: Module) -> str | None:
    """The module an ``importlib.import_module("...")`` or ``__import__("...")`` call names, when written literally."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in {"import_module", "__import__"} or not call.args:
        return None
    arg = call.args[0]
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return None
    if not arg.value.startswith("."):
        return arg.value
    # A relative name counts when its anchor is this module's own package (``__package__``/``__spec__.parent``).
    anchor = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "package"), None)
    if anchor is None or not {"__package__", "__spec__"} & {n.id for n in ast.walk(anchor) if isinstance(n, ast.Name)}:
        return None
    level = len(arg.value) - len(arg.value.lstrip("."))
    return _resolve(module, ast.ImportFrom(module=arg.value[level:] or None, names=[], level=level))


def imports_of(module: Module, known: Iterable[str]) -> Iterator[Import]:
    """The package-internal imports of ``module``, each resolved to the module it loads."""
    known = set(known)
    lines = module.source.splitlines()
    for node, where in _walk(ast.parse(module.source, module.path)):
        text = lines[node.lineno - 1].strip() if hasattr(node, "lineno") else ""
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Call) and (named := _literal_name(node, module)) is not None:
            # A module loaded by name at import time is an ordinary import; inside a function it is a hidden one.
            targets, where = [named], "lazy" if where == "function" else where
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                yield Import(module.name, target, node.lineno, text, where)


def _sibling(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in SIBLINGS and parts[2] in SIBLINGS[parts[1]]:
        return ".".join(parts[:3])
    return None


def layer_problem(imp: Import) -> str | None:
    """Why ``imp`` breaks the layers, or None."""
    src_top, dst_top = top(imp.importer), top(imp.target)
    for name in (src_top, dst_top):
        if name not in LAYERS:
            return f"top folder {name!r} is in no layer (add it to LAYERS here and to pyproject.toml)"
    src, dst = LAYERS[src_top], LAYERS[dst_top]
    if dst > src:
        return f"points up from layer {src} ({LAYER_NAMES[src]}) to layer {dst} ({LAYER_NAMES[dst]})"
    if src_top != dst_top and any({src_top, dst_top} <= group for group in INDEPENDENT_TOPS):
        return f"{src_top} and {dst_top} are independent (both layer {src})"
    if src_top == dst_top and src_top in SIBLINGS:
        mine, theirs = _sibling(imp.importer), _sibling(imp.target)
        if theirs is not None and mine is not None and mine != theirs:
            return f"{mine} and {theirs} are independent siblings"
        if theirs is not None and mine is None:
            return f"shared {src_top} modules sit below {theirs} and must not import it"
    return None


def layer_violations(modules: Mapping[str, Module]) -> list[str]:
    found = []
    for module in modules.values():
        for imp in imports_of(module, modules):
            if (why := layer_problem(imp)) is not None:
                found.append(f"{module.path}:{imp.line}: {imp.importer} imports {imp.target}: {why}\n    {imp.text}")
    return found


def hidden_imports(modules: Mapping[str, Module]) -> list[str]:
    found = []
    for module in modules.values():
        for imp in imports_of(module, modules):
            if imp.where == "function" or (imp.where == "lazy" and top(module.name) not in LAZY_LOADERS):
                kind = "loads by name" if imp.where == "lazy" else "imports"
                fix = "import it at module level"
                if top(module.name) in LAZY_LOADERS:
                    fix += " or, for lazy dispatch, load it by name with importlib.import_module"
                found.append(
                    f"{module.path}:{imp.line}: {imp.importer} {kind} {imp.target} inside a function or class body;"
                    f" {fix}\n    {imp.text}"
                )
    return found


def computed_loads(modules: Mapping[str, Module]) -> list[str]:
    """``import_module``/``__import__`` calls whose name is not written out: invisible to the layer and cycle checks,
    so only the top (lazy attributes, lazy subcommands) and the modules in COMPUTED_LOADS may make them."""
    found = []
    for module in modules.values():
        if top(module.name) in LAZY_LOADERS or module.name in COMPUTED_LOADS:
            continue
        lines = module.source.splitlines()
        for node in ast.walk(ast.parse(module.source, module.path)):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            arg = node.args[0]
            if name in {"import_module", "__import__"} and not (
                isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            ):
                found.append(
                    f"{module.path}:{node.lineno}: {module.name} loads a module whose name is computed; write the"
                    f" import out (or list the module in COMPUTED_LOADS with the reason)\n"
                    f"    {lines[node.lineno - 1].strip()}"
                )
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_cycles(modules: Mapping[str, Module]) -> list[str]:
    """One cycle per strongly connected part of the runtime (module-level, not type-checking) import graph.

    Importing ``a.b.c`` first runs the ``__init__`` of ``a.b`` unless it is already running (an ancestor of the
    importer), so that package is an edge too: a shared module importing one sibling's file can close a cycle through
    the sibling's ``__init__`` even when no file imports another in a circle."""
    edges: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for module in modules.values():
        for imp in imports_of(module, modules):
            if imp.where != "module" or imp.target not in modules:
                continue
            running = {module.name, *_ancestors(module.name)}
            for package in _ancestors(imp.target):
                if package in modules and package not in running:
                    edges[module.name].setdefault(package, replace(imp, target=package, via=imp.target))
            edges[module.name].setdefault(imp.target, imp)
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                part = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.append(member)
                    if member == node:
                        break
                if len(part) > 1 or node in edges[node]:
                    parts.append(sorted(part))
    found = []
    for part in parts:
        cycle = _cycle_within(part[0], set(part), edges)
        steps = "\n".join(
            f"    {modules[a].path}:{edges[a][b].line}: {a} -> {b}"
            + (f" (its __init__ runs first, importing {edges[a][b].via})" if edges[a][b].via else "")
            + f": {edges[a][b].text}"
            for a, b in itertools.pairwise(cycle)
        )
        found.append(f"import cycle {' -> '.join(cycle)}\n{steps}")
    return found


def _cycle_within(start: str, part: set[str], edges: Mapping[str, Mapping[str, Import]]) -> list[str]:
    """The shortest path from ``start`` back to itself inside one strongly connected part (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child not in part:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


MODULES = package_modules()


def _report(found: list[str], what: str) -> str:
    return f"{len(found)} {what} (docs/architecture.md):\n" + "\n".join(found)


def test_the_package_has_the_layered_folders() -> None:
    tops = {top(name) for name in MODULES}
    assert {"core", "metrics", "tuners", "data", "methods", "experiments", ""} <= tops
    assert tops <= set(LAYERS), f"top folders in no layer: {sorted(tops - set(LAYERS))}"


def test_imports_point_down_the_layers() -> None:
    found = layer_violations(MODULES)
    assert not found, _report(found, "imports break the layers")


def test_no_package_import_hides_in_a_function() -> None:
    found = hidden_imports(MODULES)
    assert not found, _report(found, "package imports inside functions")


def test_no_module_below_the_top_loads_a_computed_name() -> None:
    found = computed_loads(MODULES)
    assert not found, _report(found, "computed module loads")


def test_the_checker_catches_a_computed_load() -> None:
    modules = _synthetic(
        {
            f"{PACKAGE}.methods.patcher.memory": (
                "import importlib\n\nNAME = 'transformer_patcher.experiments.fixer'\n"
                "fixer = importlib.import_module(NAME)\n"
            ),
            f"{PACKAGE}.cli": "import importlib\n\ndef run(name):\n    return importlib.import_module(name)\n",
        }
    )
    found = computed_loads(modules)
    assert len(found) == 1 and "methods/patcher/memory.py:4:" in found[0], found


def test_the_module_import_graph_has_no_cycles() -> None:
    found = import_cycles(MODULES)
    assert not found, _report(found, "import cycles")


def test_import_linter_layers_match_this_table() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers" and c.get("containers") == [PACKAGE]]
    listed: dict[str, int] = {}
    for rank, layer in enumerate(reversed(contract["layers"])):
        for name in layer.replace(":", "|").split("|"):
            listed[name.strip().strip("()")] = rank
    by_layer = {name: LAYERS[name] for name in LAYERS if name}
    # import-linter lists __main__ in a layer of its own above cli; otherwise the same order.
    assert {k: v for k, v in listed.items() if k != "__main__"} == {
        k: v for k, v in by_layer.items() if k != "__main__"
    }
    independence = [set(c["modules"]) for c in config["contracts"] if c["type"] == "independence"]
    for folder, names in SIBLINGS.items():
        assert {f"{PACKAGE}.{folder}.{n}" for n in names} in independence, folder


def test_import_linter_contracts_are_kept() -> None:
    """``make lint`` runs the same check; here it also runs in CI (``make test``) when import-linter is installed."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def _synthetic(sources: Mapping[str, str]) -> dict[str, Module]:
    """Modules from source text; a name ending in ``.__init__`` is a package."""
    modules = {}
    for name, source in sources.items():
        package = name.endswith(".__init__")
        module = name.removesuffix(".__init__")
        modules[module] = Module(module, name.replace(".", "/") + ".py", source, is_package=package)
    return modules


def test_the_checker_catches_upward_hidden_and_circular_imports() -> None:
    modules = _synthetic(
        {
            f"{PACKAGE}.core.low": (
                "from transformer_patcher.experiments.fixer import Patcher\n"
                "\n"
                "def later():\n"
                "    from ..methods.patcher import trainer\n"
                "    return trainer\n"
            ),
            f"{PACKAGE}.experiments.fixer": "from transformer_patcher.core import low\n",
            f"{PACKAGE}.tuners.delta.layer": "from ..patcher.layer import PatcherLayer\n",
            f"{PACKAGE}.tuners.patcher.layer": (
                "import importlib\n\nlow = importlib.import_module('transformer_patcher.core.low')\n"
            ),
            f"{PACKAGE}.tuners.bounds": "import transformer_patcher.tuners.patcher.layer\n",
            f"{PACKAGE}.methods.patcher.trainer": (
                "import importlib\n\ndef f():\n    return importlib.import_module('.memory', __package__)\n"
            ),
            f"{PACKAGE}.cli": (
                "import importlib\n"
                "\n"
                "def run():\n"
                "    return importlib.import_module('transformer_patcher.experiments.fixer')\n"
            ),
        }
    )
    layers = layer_violations(modules)
    assert any(
        "transformer_patcher/core/low.py:1: transformer_patcher.core.low imports transformer_patcher.experiments.fixer"
        ": points up from layer 0"
        in v
        and "from transformer_patcher.experiments.fixer import Patcher" in v
        for v in layers
    ), layers
    assert any("delta/layer.py:1:" in v and "independent siblings" in v for v in layers), layers
    assert any("tuners/bounds.py:1:" in v and "shared tuners modules sit below" in v for v in layers), layers
    assert len(layers) == 4, layers  # the hidden import of methods from core is upward too

    hidden = hidden_imports(modules)
    assert len(hidden) == 2, hidden  # the cli may load modules by name, the methods layer may not
    assert any(
        "transformer_patcher/core/low.py:4: transformer_patcher.core.low imports transformer_patcher.methods" in v
        and "from ..methods.patcher import trainer" in v
        for v in hidden
    ), hidden
    assert any(
        "methods/patcher/trainer.py:4: transformer_patcher.methods.patcher.trainer loads by name "
        "transformer_patcher.methods.patcher.memory" in v
        for v in hidden
    ), hidden

    cycles = import_cycles(modules)
    assert len(cycles) == 1, cycles
    low, fixer = f"{PACKAGE}.core.low", f"{PACKAGE}.experiments.fixer"
    assert cycles[0].startswith(f"import cycle {low} -> {fixer} -> {low}\n"), cycles
    assert (
        f"transformer_patcher/experiments/fixer.py:1: {fixer} -> {low}: from transformer_patcher.core import low"
        in (cycles[0])
    ), cycles


def test_the_checker_catches_a_cycle_through_a_package_init() -> None:
    """No file imports another in a circle, but importing ``tuners.patcher.patch_file`` runs the package's
    ``__init__``, which imports ``config``, which imports the half-initialised ``config_file``."""
    modules = _synthetic(
        {
            f"{PACKAGE}.tuners.config_file": "from transformer_patcher.tuners.patcher.patch_file import locate\n",
            f"{PACKAGE}.tuners.patcher.__init__": "from transformer_patcher.tuners.patcher.config import Config\n",
            f"{PACKAGE}.tuners.patcher.config": "from transformer_patcher.tuners.config_file import VIEWS\n",
            f"{PACKAGE}.tuners.patcher.patch_file": "locate = None\n",
        }
    )
    (cycle,) = import_cycles(modules)
    tuners = f"{PACKAGE}.tuners"
    assert cycle.startswith(
        f"import cycle {tuners}.config_file -> {tuners}.patcher -> {tuners}.patcher.config -> {tuners}.config_file\n"
    ), cycle
    assert f"(its __init__ runs first, importing {tuners}.patcher.patch_file)" in cycle, cycle
    # A module's own packages are already running when it is imported: no cycle through them.
    own = _synthetic(
        {
            f"{PACKAGE}.methods.pmet.__init__": "from transformer_patcher.methods.pmet.editor import Editor\n",
            f"{PACKAGE}.methods.pmet.editor": "from transformer_patcher.methods.pmet.update import solve\n",
            f"{PACKAGE}.methods.pmet.update": "solve = None\n",
        }
    )
    assert import_cycles(own) == []


def test_type_checking_imports_are_module_level_and_run_no_cycle() -> None:
    modules = _synthetic(
        {
            f"{PACKAGE}.core.a": "from transformer_patcher.core import b\n",
            f"{PACKAGE}.core.b": (
                "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from transformer_patcher.core import a\n"
            ),
        }
    )
    assert hidden_imports(modules) == []
    assert import_cycles(modules) == []
    assert layer_violations(modules) == []
