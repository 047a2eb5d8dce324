"""The package's rooms (``greenmim/<room>/``) import each other without cycles.

Every import counts, module level or inside a function; only imports under ``if TYPE_CHECKING:``
(annotations) are exempt. A cycle means a room holds code that belongs in another.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[1] / "greenmim"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def _imports(path: Path) -> Set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    module = _module(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            found.update(n for n in names if n.startswith("greenmim."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("greenmim."))
    return found


def room_graph() -> Dict[str, Set[str]]:
    """``{room: rooms it imports}`` over every module of the package."""
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        here = _room(_module(path))
        for target in _imports(path):
            there = _room(target)
            if there in rooms and there != here:
                graph.setdefault(here, set()).add(there)
    return graph


def _cycle(graph: Dict[str, Set[str]]):
    state: Dict[str, int] = {}
    stack = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_rooms_import_each_other_without_cycles():
    cycle = _cycle(room_graph())
    assert cycle is None, "import cycle between rooms: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_device_kernels_do_not_import_the_host_planner():
    """``ops`` runs on the device and knows nothing of planning (``plan`` builds on ``ops``, not back)."""
    assert "plan" not in room_graph().get("ops", set())


def test_the_readme_layout_table_names_every_room():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## How the package is laid out"):]
    rooms = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    missing = [r for r in rooms if f"`greenmim/{r}/`" not in table]
    assert not missing, f"README's layout table lacks {missing}"
    stale = [name for name in ("masking.py", "planning.py", "grouping.py`)", "pretrain_task.py", "detection/", "evaluation/")
             if f"`greenmim/{name}" in table]
    assert not stale, f"README's layout table names moved modules {stale}"
