"""The house, measured from the code's own imports: a package for each way in, arrows pointing down.

Rooms, from the top: the entry points (``slimnet``, ``train``, ``export``) -> ``run`` (the command line's
pipeline) -> ``tasks`` -> ``deploy`` -> ``data`` -> ``loops`` (training-loop adapters) -> ``core`` (the
framework-free slimming session) -> ``sparsity`` -> ``engine`` (plain-PyTorch cut) -> ``models`` ->
``graph`` -> ``errors`` / ``locate`` / ``modes``. A module may import its own room and the rooms below it, never
one above; no import circle; no private name crosses a room; the rooms below ``loops`` import no
training framework."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "slimnet"
RANK = {"errors": 0, "locate": 0, "modes": 0, "graph": 1, "models": 2, "engine": 3, "sparsity": 4, "core": 5,
        "loops": 6, "data": 7, "deploy": 8, "tasks": 9, "run": 10, "train": 11, "export": 11, "": 12}
FRAMEWORK_FREE = {"errors", "locate", "modes", "graph", "models", "engine", "sparsity", "core"}
FRAMEWORKS = ("pytorch_lightning", "lightning", "hydra", "omegaconf", "mmengine", "ultralytics")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path):
    """(imported module, names taken from it) for every import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
EDGES = {m: [(target, names) for target, names in _imports(p)] for m, p in MODULES.items()}


def test_every_room_is_ranked():
    assert {_room(m) for m in MODULES} <= set(RANK), "a new room: give it its place in RANK (and docs/architecture.md)"


def test_the_root_holds_few_modules():
    root = [p.name for p in PACKAGE.glob("*.py")]
    assert len(root) <= 8, root


def test_arrows_point_down():
    upward = [f"{m} -> {t}" for m, edges in EDGES.items() for t, _ in edges
              if t.startswith("slimnet") and RANK[_room(t)] > RANK[_room(m)]]
    assert not upward, "imports from a lower room to a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {m: {t for t, _ in edges if t in MODULES and t != m} for m, edges in EDGES.items()}
    # a package's __init__ re-exporting its own modules is not a circle of ideas: skip those edges
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    seen, stack, circles = set(), [], []

    def visit(m):
        if m in stack:
            circles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not circles, "\n".join(circles)


def test_no_private_name_crosses_a_room():
    crossing = []
    for m, edges in EDGES.items():
        for target, names in edges:
            if not target.startswith("slimnet") or _room(target) == _room(m):
                continue
            private = [n for n in names if n.startswith("_")]
            if private or any(part.startswith("_") for part in target.split(".")):
                crossing.append(f"{m} takes {target} {private}")
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("room", sorted(FRAMEWORK_FREE))
def test_the_lower_rooms_import_no_training_framework(room):
    used = [f"{m} imports {t}" for m, edges in EDGES.items() if _room(m) == room
            for t, _ in edges if t.split(".")[0] in FRAMEWORKS]
    assert not used, "\n".join(used)
