"""The shape of the code, read from the source with ast (nothing is imported, so neither torch nor Slicer is needed).

- DiffSegCore's module graph has no import circle;
- imports point down the layers only (modules of one package may import each other);
- the top level of DiffSegCore stays small;
- the core never imports Slicer, Qt, VTK or the extension;
- the Slicer GUI process (DiffSeg.py, DiffSegLib, Scripts/batch.py) imports only torch-free modules.

Every import counts, also one inside a function (a lazy import) and `from package import submodule`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = "DiffSegCore"
EXTENSION = REPO / "DiffSegExtension"

# Layer of each part of the core, by the first name under DiffSegCore. Files directly in DiffSegCore are layer 0,
# except __main__. A module may import modules of its own package and of lower or equal layers, never higher ones.
LAYERS = {
    "io": 1,
    "networks": 1,
    "diffusion": 1,
    "models": 2,
    "inference": 3,
    "evaluation": 4,
    "training": 5,
    "cli": 6,
    "__main__": 7,
}
MAX_TOP_LEVEL = 8
SLICER_SIDE = ("slicer", "qt", "vtk", "vtkmodules", "ctk", "PythonQt", "DiffSegLib", "DiffSeg", "SampleData")
HEAVY = ("torch", "monai")
# Core modules above layer 0 that the GUI process may import: torch-free by design.
GUI_ALLOWED = (
    "DiffSegCore.io.cases",
    "DiffSegCore.models.registry",
    "DiffSegCore.models.metadata",
    "DiffSegCore.inference.memory",
)


# --- reading the imports -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. DiffSegCore.io.cases; a package is named by its folder
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module, as far down as the tree has it (DiffSegCore.io.cases, torch.nn)
    path: Path
    line: int
    lazy: bool  # inside a function: runs only when the function is called
    typing: bool  # under `if TYPE_CHECKING:`: never runs

    def where(self) -> str:
        kind = " (lazy)" if self.lazy else " (TYPE_CHECKING)" if self.typing else ""
        return f"{self.path.relative_to(REPO)}:{self.line}{kind}"


def modules_under(root: Path, folder: Path) -> dict[str, Module]:
    """Every .py file under `folder`, named as Python would from `root` on sys.path."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = Module(".".join(parts), path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """Raw imports of one file: (level, module, names or None, line, lazy, typing)."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str, tuple[str, ...] | None, int, bool, bool]] = []
        self._depth = 0
        self._typing = 0

    def _add(self, level: int, module: str, names: tuple[str, ...] | None, line: int) -> None:
        self.found.append((level, module, names, line, self._depth > 0, self._typing > 0))

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._typing += 1
        for child in node.body:
            self.visit(child)
        self._typing -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(0, alias.name, None, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._add(node.level, node.module or "", tuple(alias.name for alias in node.names), node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        """importlib.import_module("x") and __import__("x") with a literal name are imports too."""
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
                self._add(0, first.value, None, node.lineno)
        self.generic_visit(node)


def _deepest_known(name: str, known: dict[str, Module]) -> str:
    """`name` cut back to the longest prefix that is a module of the tree; an outside name stays whole."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return name


def imports_of(module: Module, known: dict[str, Module]) -> list[Import]:
    collector = _Collector()
    collector.visit(ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path)))
    result = []
    for level, name, names, line, lazy, typing in collector.found:
        if level:
            package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
            package = package[: len(package) - (level - 1)]
            name = ".".join([*package, name] if name else package)
        if names is None:
            targets = [_deepest_known(name, known)]
        else:  # `from X import y` imports the submodule X.y where there is one, else takes a name from X
            targets = [f"{name}.{n}" if f"{name}.{n}" in known else _deepest_known(name, known) for n in names]
        for target in dict.fromkeys(targets):
            result.append(Import(module.name, target, module.path, line, lazy, typing))
    return result


@cache
def core_modules() -> dict[str, Module]:
    return modules_under(REPO, REPO / CORE)


@cache
def core_imports() -> tuple[Import, ...]:
    known = core_modules()
    return tuple(imp for module in known.values() for imp in imports_of(module, known))


def internal_edges(imports: tuple[Import, ...] | list[Import], known: dict[str, Module]) -> list[Import]:
    return [imp for imp in imports if imp.target in known and imp.target != imp.source]


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """One import circle per strongly connected group of modules (Tarjan), as the list of imports that close it."""
    graph: dict[str, dict[str, Import]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
        graph.setdefault(edge.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for group in groups:  # the shortest circle through the group's first module, found breadth first
        members, start = set(group), group[0]
        came_from: dict[str, Import] = {}
        frontier = [start]
        while frontier and start not in came_from:
            following = []
            for node in frontier:
                for nxt, edge in sorted(graph[node].items()):
                    if nxt in members and nxt not in came_from:
                        came_from[nxt] = edge
                        following.append(nxt)
            frontier = following
        circle, node = [], start
        while True:
            edge = came_from[node]
            circle.append(edge)
            node = edge.source
            if node == start:
                break
        cycles.append(circle[::-1])
    return cycles


def describe_cycle(circle: list[Import]) -> str:
    path = " -> ".join([circle[0].source, *(edge.target for edge in circle)])
    return path + "\n    " + "\n    ".join(f"{e.source} -> {e.target} at {e.where()}" for e in circle)


def layer(module: str) -> int | None:
    """The layer of a core module; None for a subpackage the table does not know."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if (REPO / CORE / f"{parts[1]}.py").is_file():
        return LAYERS.get(parts[1], 0)
    return LAYERS.get(parts[1])


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _matches(target: str, names: tuple[str, ...]) -> bool:
    return any(target == name or target.startswith(name + ".") for name in names)


# --- the builder itself --------------------------------------------------------------------------------------------


def test_graph_builder_reads_relative_lazy_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("import os\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import base\n")
    (pkg / "sub" / "a.py").write_text(
        "from . import b\n"
        "from ..base import thing\n"
        "from pkg import sub\n"
        "def later():\n"
        "    import torch.nn\n"
        "    from pkg.sub.b import name\n"
    )
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import a\n"
    )
    known = modules_under(tmp_path, pkg)
    imports = {(i.source, i.target, i.lazy, i.typing) for m in known.values() for i in imports_of(m, known)}
    assert ("pkg.sub", "pkg.base", False, False) in imports
    assert ("pkg.sub.a", "pkg.sub.b", False, False) in imports
    assert ("pkg.sub.a", "pkg.base", False, False) in imports
    assert ("pkg.sub.a", "pkg.sub", False, False) in imports
    assert ("pkg.sub.a", "torch.nn", True, False) in imports
    assert ("pkg.sub.a", "pkg.sub.b", True, False) in imports
    assert ("pkg.sub.b", "pkg.sub.a", False, True) in imports
    cycles = find_cycles(internal_edges([i for m in known.values() for i in imports_of(m, known)], known))
    assert [[(e.source, e.target) for e in c] for c in cycles] == [
        [("pkg.sub.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.sub.a")]
    ]


def test_graph_builder_finds_known_core_edges():
    edges = {(i.source, i.target) for i in internal_edges(core_imports(), core_modules())}
    assert len(core_modules()) > 20
    assert ("DiffSegCore.cli.main", "DiffSegCore.errors") in edges
    assert ("DiffSegCore.__main__", "DiffSegCore.cli.main") in edges
    assert ("DiffSegCore.models.downloads", "DiffSegCore") in edges  # from DiffSegCore import __version__


# --- the core ------------------------------------------------------------------------------------------------------


def test_core_has_no_import_circle():
    # A circle is a circle whether its imports run at load time or later; only TYPE_CHECKING imports never run.
    edges = [imp for imp in internal_edges(core_imports(), core_modules()) if not imp.typing]
    cycles = find_cycles(edges)
    if cycles:
        pytest.fail("import circles in DiffSegCore:\n" + "\n".join(describe_cycle(c) for c in cycles))


def test_every_core_package_has_a_layer():
    unknown = sorted({part(name) for name in core_modules() if layer(name) is None})
    assert not unknown, f"subpackages of DiffSegCore missing from LAYERS in {Path(__file__).name}: {unknown}"


def test_core_imports_point_down_only():
    upward = [
        f"{imp.source} -> {imp.target} (layer {layer(imp.source)} -> {layer(imp.target)}) at {imp.where()}"
        for imp in internal_edges(core_imports(), core_modules())
        if part(imp.source) != part(imp.target)
        and None not in (layer(imp.source), layer(imp.target))
        and layer(imp.target) > layer(imp.source)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_core_top_level_stays_small():
    files = sorted(path.name for path in (REPO / CORE).glob("*.py"))
    assert len(files) <= MAX_TOP_LEVEL, f"{len(files)} modules directly in {CORE}/ (at most {MAX_TOP_LEVEL}): {files}"


def test_core_never_imports_the_slicer_side():
    found = [
        f"{imp.source} imports {imp.target} at {imp.where()}"
        for imp in core_imports()
        if _matches(imp.target, SLICER_SIDE)
    ]
    assert not found, "the core must run without Slicer, Qt or VTK:\n" + "\n".join(found)


def test_core_modules_the_gui_may_import_load_without_torch():
    """Importing a torch-free module must not pull torch in through its load-time imports (lazy ones run on call)."""
    known = core_modules()
    by_source: dict[str, list[Import]] = {}
    for imp in core_imports():
        if not imp.lazy and not imp.typing:
            by_source.setdefault(imp.source, []).append(imp)
    roots = [name for name in known if layer(name) == 0 and part(name) != "__main__"]
    roots += [name for name in GUI_ALLOWED if name in known]
    found = []
    for root in roots:
        chain: dict[str, list[str]] = {root: [root]}
        todo = [root]
        while todo:
            module = todo.pop()
            parents = [".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 1)]
            for imp in [
                *by_source.get(module, []),
                *(Import(module, p, known[p].path, 0, False, False) for p in parents),
            ]:
                if _matches(imp.target, HEAVY):
                    found.append(f"{root}: {' -> '.join(chain[module])} -> {imp.target} at {imp.where()}")
                elif imp.target in known and imp.target not in chain:
                    chain[imp.target] = [*chain[module], imp.target]
                    todo.append(imp.target)
    assert not found, "modules meant to be torch-free load torch or MONAI:\n" + "\n".join(sorted(set(found)))


# --- the Slicer GUI process ----------------------------------------------------------------------------------------


def gui_files() -> list[Path]:
    files = [
        EXTENSION / "DiffSeg.py",
        *sorted((EXTENSION / "DiffSegLib").glob("*.py")),
        EXTENSION / "Scripts" / "batch.py",
    ]
    return [path for path in files if path.is_file()]


def gui_imports(path: Path) -> list[Import]:
    known = {**modules_under(EXTENSION, EXTENSION), **core_modules()}
    module = next(m for m in known.values() if m.path == path)
    return imports_of(module, known)


def test_gui_files_are_found():
    names = {path.relative_to(EXTENSION).as_posix() for path in gui_files()}
    assert {"DiffSeg.py", "DiffSegLib/logic.py", "Scripts/batch.py"} <= names


@pytest.mark.parametrize("path", gui_files(), ids=lambda p: p.relative_to(EXTENSION).as_posix())
def test_gui_never_imports_torch_or_monai(path: Path):
    found = [f"{imp.target} at {imp.where()}" for imp in gui_imports(path) if _matches(imp.target, HEAVY)]
    assert not found, f"{path.relative_to(REPO)} runs in Slicer's GUI process and must not import torch or MONAI:\n" + (
        "\n".join(found)
    )


@pytest.mark.parametrize("path", gui_files(), ids=lambda p: p.relative_to(EXTENSION).as_posix())
def test_gui_imports_only_torch_free_core_modules(path: Path):
    known = core_modules()

    def allowed(target: str) -> bool:
        return (layer(target) == 0 and part(target) != "__main__") or target in GUI_ALLOWED

    found = [
        f"{imp.target} (layer {layer(imp.target)}) at {imp.where()}"
        for imp in gui_imports(path)
        if imp.target in known and not allowed(imp.target)
    ]
    assert not found, (
        f"{path.relative_to(REPO)} may import only layer-0 modules and {', '.join(GUI_ALLOWED)} of the core:\n"
        + "\n".join(found)
    )
