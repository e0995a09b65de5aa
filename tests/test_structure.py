"""The package's shape: every module imports on its own, no import loops, small modules, no private imports.

The import graph is read from the source with ``ast``: every ``import`` /
``from ... import`` of an ``hf_chts`` module, also inside functions (where the
old ``model.py <-> checkpoint.py`` loop hid). Importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``, so those are edges too, except the importing
module's own parent packages (already being initialised when it runs) unless it
takes names from their ``__init__`` (as the old ``from . import __version__`` did).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_chts"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, [names taken from it])`` for every import statement of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
    return found


def import_edges(path: Path) -> set[str]:
    """hf_chts modules whose code importing ``path`` runs or reads names from."""
    importer = module_name(path)
    own_parents = {importer.rsplit(".", depth)[0] for depth in range(1, importer.count(".") + 1)}
    if path.name == "__init__.py":
        own_parents.add(importer)
    edges = set()
    for target, names in imported_names(path):
        submodules = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}  # `from . import x`
        edges |= submodules
        takes_names = len(submodules) < len(names) or not names
        parts = target.split(".")
        for end in range(1, len(parts) + 1):
            candidate = ".".join(parts[:end])
            if candidate not in MODULES:
                continue
            if candidate in own_parents and not (candidate == target and takes_names):
                continue
            edges.add(candidate)
    edges.discard(importer)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_known_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"q"}, "q": {"p"}}) == ["p", "p.x", "q", "p"]


def test_import_edges_resolve_relative_and_parent_packages():
    edges = import_edges(MODULES["hf_chts.checkpointing.loading"])
    assert {"hf_chts.model", "hf_chts.checkpointing.format", "hf_chts.state"} <= edges
    assert "hf_chts" not in edges and "hf_chts.checkpointing" not in edges  # its own parents
    assert {"hf_chts.checkpointing.saving", "hf_chts.checkpointing"} <= import_edges(MODULES["hf_chts.model"])
    assert {"hf_chts.evaluation", "hf_chts.checkpoint"} <= import_edges(MODULES["hf_chts.recipe.finish"])  # from .. import x


def test_import_graph_has_no_cycles():
    graph = {name: import_edges(path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def unit_of(module: str) -> str:
    """The part of the package a module belongs to: ``hf_chts.checkpointing.loading`` -> ``hf_chts.checkpointing``."""
    return ".".join(module.split(".")[:2])


#: two parts that import each other, and why it is allowed: ``sparsify`` installs the save hook
#: (``model`` -> ``checkpointing.saving``) and loading re-sparsifies (``checkpointing.loading`` -> ``model``)
KNOWN_TWO_WAY = {frozenset({"hf_chts.model", "hf_chts.checkpointing"})}


def test_parts_of_the_package_import_each_other_one_way_only():
    """Checkpointing, inference and the model card (issue 19 item 10): the loading front
    (``hf_chts.checkpoint.load_sparse``) sits above checkpointing and inference, and the card
    writer takes the record as an argument, so none of these pairs imports both ways."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for target in import_edges(path):
            source, imported = unit_of(name), unit_of(target)
            if source != imported and imported != "hf_chts":
                graph.setdefault(source, set()).add(imported)
    two_way = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())
                      and frozenset({a, b}) not in KNOWN_TWO_WAY})
    assert not two_way, f"parts importing each other: {two_way}"
    assert "hf_chts.inference" in graph["hf_chts.checkpoint"] and "hf_chts.checkpointing" in graph["hf_chts.inference"]
    assert "hf_chts.model_card" in graph["hf_chts.checkpointing"]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, path in MODULES.items():
        for target, names in imported_names(path):
            if not target.startswith("hf_chts"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [part for part in target.split(".") if part.startswith("_") and not part.startswith("__")]
            if private and target != name:
                offenders.append(f"{name} imports {private} from {target}")
    assert not offenders, "\n".join(offenders)


def test_no_module_exceeds_the_line_limit():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


@pytest.mark.slow  # a subprocess
def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imported first in a clean state (a loop only shows when its module is imported first)."""
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'hf_chts' or m.startswith('hf_chts.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed.append(f'{name}: {type(error).__name__}: {error}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *MODULES], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
