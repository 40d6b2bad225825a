"""The package's imports point one way: no module of `fastrank` imports itself back, directly or not.

What counts as an edge A -> B (B a module of `fastrank`):
- every `import` / `from ... import` statement in A, at module level AND inside functions or methods.
  A lazy import hides a cycle from the interpreter, not from a reader: `model.py` importing
  `routing` inside `from_pretrained` still means the base model knows its subclass. Statements under
  `if TYPE_CHECKING:` are left out (they never run, and annotations are allowed to point up).
- `from pkg import name` goes to `pkg.name` when that is a module, else to `pkg` (its `__init__`).
- relative imports are resolved against A's package.
What does not: the implicit import of a parent package when a submodule is imported
(`import fastrank.data.alfworld.replay` first runs `fastrank/data/alfworld/__init__.py`). Counting it
would make every package that re-exports its submodules a cycle, which is the usual facade, not a tangle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastrank"


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    skip.update(id(n) for n in ast.walk(stmt))
    return skip


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_edges(modules: dict[str, Path], package: str) -> dict[str, set[str]]:
    """module -> the package modules it imports (see the module docstring for what counts)."""

    def known(name: str) -> str | None:
        # `import fastrank.data.record as r` imports that module; a dotted name that is not a module
        # (cannot happen for `import`, but can after resolving `from`) falls back to its longest module prefix.
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                src = (_resolve_relative(mod, is_pkg, node.level, node.module) if node.level else node.module) or ""
                if src.split(".")[0] != package:
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.append(sub if sub in modules else src)
            for t in targets:
                dst = known(t)
                if dst is not None and dst != mod:
                    edges[mod].add(dst)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(cycle, component) per strongly connected component of more than one module (Tarjan): the
    shortest closed path through the component's first module, and every module of the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)

    cycles = []
    for comp in sccs:
        members = set(comp)
        start = comp[0]
        # shortest path start -> ... -> start inside the component (BFS), so the message names a real loop
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & members):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [start]
        v = end
        while v != start:
            path.insert(1, v)
            v = prev[v]
        cycles.append((path + [start], comp))
    return cycles


def format_cycles(cycles: list[tuple[list[str], list[str]]]) -> str:
    lines = []
    for cycle, comp in cycles:
        lines.append(" -> ".join(cycle))
        rest = [m for m in comp if m not in cycle]
        if rest:  # the same tangle reaches further than the one loop printed
            lines.append("  also in this tangle: " + ", ".join(rest))
    return "\n".join(lines)


def test_no_import_cycle_in_the_package():
    modules = module_files(ROOT / PACKAGE, PACKAGE)
    assert len(modules) > 20, f"found only {len(modules)} modules under {ROOT / PACKAGE}"
    cycles = find_cycles(import_edges(modules, PACKAGE))
    assert not cycles, "import cycles in fastrank/ (lazy imports inside functions count):\n" + format_cycles(cycles)


# --------------------------------------------------------------------------- the checker itself

def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return module_files(root / "pkg", "pkg")


def test_checker_finds_a_lazy_cycle_and_prints_it(tmp_path):
    mods = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/model.py": "def load():\n    from pkg.routing import Routed\n    return Routed\n",
        "pkg/routing/__init__.py": "from .model import Routed\n",
        "pkg/routing/model.py": "from ..model import load\nclass Routed: pass\n",
    })
    cycles = find_cycles(import_edges(mods, "pkg"))
    assert format_cycles(cycles) == "pkg.model -> pkg.routing -> pkg.routing.model -> pkg.model"


@pytest.mark.parametrize("files, expect", [
    # from-import of a submodule is an edge to the submodule, not to the package
    ({"pkg/__init__.py": "from pkg import a\n", "pkg/a.py": "from pkg import b\n", "pkg/b.py": ""}, []),
    # a parent package re-exporting its submodule is not a cycle (implicit parent imports do not count)
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from pkg.sub.x import f\n", "pkg/sub/x.py": "def f(): pass\n"}, []),
    # ... but a submodule importing a name from its own package's __init__ is
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from pkg.sub.x import f\nY = 1\n",
      "pkg/sub/x.py": "from pkg.sub import Y\ndef f(): pass\n"}, ["pkg.sub -> pkg.sub.x -> pkg.sub"]),
    # TYPE_CHECKING imports never run
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import B\n",
      "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\nclass B: pass\n"}, []),
    # relative import two levels up, inside a method
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg.s.b import B\n", "pkg/s/__init__.py": "",
      "pkg/s/b.py": "class B:\n    def f(self):\n        from .. import a\n"}, ["pkg.a -> pkg.s.b -> pkg.a"]),
])
def test_checker_edges(tmp_path, files, expect):
    mods = _write(tmp_path, files)
    assert [" -> ".join(c) for c, _ in find_cycles(import_edges(mods, "pkg"))] == expect
