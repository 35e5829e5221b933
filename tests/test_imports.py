"""No import circle in the package: every ``import`` statement counts, those inside
functions too (a lazy import only hides a circle until the function runs); only the
``if TYPE_CHECKING:`` blocks, which never run, are left out.

The graph is read from the source with ``ast``, nothing is imported. An edge goes to the
module named (``from .x import y`` -> ``x``; ``from . import x`` -> ``x`` when ``x`` is a
module), not to the packages around it, which Python imports first in any case.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "downloader"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of ``package`` (dotted name) -> the package's modules it imports."""
    files = {_module_name(package, path): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        targets: set[str] = set()
        for node in _imports(tree):
            for name in _names(module, path.name == "__init__.py", node):
                # ``from a import b``: the module ``a.b`` if there is one, else ``a``.
                base, _, last = name.rpartition(":")
                full = f"{base}.{last}" if base else last
                target = full if full in files else base
                if target in files and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def _module_name(package: Path, path: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all but the bodies of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
    return name == "TYPE_CHECKING"


def _names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """``a.b`` for ``import a.b``; ``base:name`` for ``from base import name`` (relative
    imports resolved against ``module``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        anchor = here[: len(here) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return [f"{base}:{alias.name}" for alias in node.names]


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Each group of modules that import each other (a strongly connected component,
    Tarjan's) with one circle through it, sorted: ``[a, b, a]`` reads "a imports b
    imports a"."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[tuple[list[str], list[str]]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set(stack[stack.index(node) :])
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append((_circle(graph, component), sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest way from the component's first module back to itself."""
    start = min(component)
    paths: dict[str, list[str]] = {}
    frontier = [[start]]
    while start not in paths:
        step = []
        for path in frontier:
            for target in sorted(graph[path[-1]] & component):
                if target not in paths:
                    paths[target] = [*path, target]
                    step.append(paths[target])
        frontier = step
    return paths[start]


def test_the_package_has_no_import_circle() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import circles:\n" + "\n".join(
        f"{' -> '.join(circle)} (the group: {', '.join(group)})" for circle, group in found
    )


def test_the_reader_sees_lazy_and_relative_imports_but_not_type_checking_ones(
    tmp_path: Path,
) -> None:
    files = {
        "__init__.py": "from .a import thing\n",
        "a.py": "def f():\n    from .sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n"
        "else:\n    from ..c import x\n",
        "c.py": "import pkg.a\n",
        "d.py": "from .sub import c\nfrom . import sub\n",  # sub.c is no module: sub
    }
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    graph = import_graph(tmp_path / "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
        "pkg.d": {"pkg.sub"},
    }
    circle = ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert cycles(graph) == [(circle, sorted(circle[:-1]))]
