"""The layering of rlvr's modules, written down here and kept: no import circle, no import upward.

Every ``import`` of every module under the four source folders is read with ``ast`` (those
inside functions and ``TYPE_CHECKING`` blocks too: a lazy import is still a dependency),
and the graph must be

- **acyclic**;
- **layered**: a module imports only modules of its own layer or of a lower one (the table
  below, mirrored in the README's "Architecture" section);
- **three rooms at the top**: the synchronous loop, the one-machine pipeline and the cluster
  do not import one another (what they share is in ``step.py`` and ``run.py``);
- **Ray in one folder**: only ``trainer/cluster/`` imports ``ray``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"verifiers": "rlvr.verifiers", "datasets": "rlvr.datasets", "envs": "rlvr.envs", "trainer": "rlvr.trainer"}

# Lowest first: (layer name, module prefixes). A module belongs to the layer of its longest prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("verifiers, datasets", ("rlvr.verifiers", "rlvr.datasets")),
    ("envs", ("rlvr.envs",)),
    ("protocols", ("rlvr.trainer.protocols",)),
    ("algorithm", ("rlvr.trainer.algorithm",)),
    ("config", ("rlvr.trainer.config", "rlvr.trainer.flags", "rlvr.trainer.recipes")),
    ("engines, weights", ("rlvr.trainer.engines", "rlvr.trainer.weights")),
    ("bookkeeping", ("rlvr.trainer.bookkeeping",)),
    ("step", ("rlvr.trainer.step",)),
    ("run", ("rlvr.trainer.run",)),
    ("loops", ("rlvr.trainer.sync_loop", "rlvr.trainer.pipeline", "rlvr.trainer.cluster")),
]
ROOMS = ("rlvr.trainer.sync_loop", "rlvr.trainer.pipeline", "rlvr.trainer.cluster")
"""Modules of the top layer that may not import one another's room."""
SIBLINGS_APART = [("rlvr.verifiers", "rlvr.datasets")]
"""Pairs in one layer that may not import each other either."""
RAY_ONLY_IN = "rlvr.trainer.cluster"


def module_files() -> dict[str, Path]:
    """Every module under the four source folders, by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved against ``name``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(name.split(".")[: -node.level] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return out


def graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the rlvr modules it imports (names that are not modules, like classes, dropped)."""
    return {name: {m for m in imports_of(path, name) if m in files and m != name} for name, path in files.items()}


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """Return one import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def _room(module: str) -> str | None:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the layering, as a sentence naming both modules."""
    out = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if layer_of(src) < 0 or layer_of(dst) < 0:
                out.append(f"{src} -> {dst}: a module in no layer (add it to LAYERS)")
            elif layer_of(dst) > layer_of(src):
                low, high = LAYERS[layer_of(src)][0], LAYERS[layer_of(dst)][0]
                out.append(f"{src} ({low}) imports {dst} ({high}), a higher layer")
            elif _room(src) and _room(dst) and _room(src) != _room(dst):
                out.append(f"{src} imports {dst}: the loops do not import one another (share through step.py, run.py)")
            for a, b in SIBLINGS_APART:
                if src.startswith(a) and dst.startswith(b) or src.startswith(b) and dst.startswith(a):
                    out.append(f"{src} imports {dst}: {a} and {b} stand apart")
    return out


def test_every_module_is_in_a_layer():
    assert [m for m in module_files() if layer_of(m) < 0] == []


def test_no_import_circle():
    cycle = find_cycle(graph(module_files()))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_import_against_the_layering():
    assert violations(graph(module_files())) == []


def test_only_the_cluster_folder_imports_ray():
    files = module_files()
    offenders = sorted(
        name for name, path in files.items()
        if not name.startswith(RAY_ONLY_IN) and any(m == "ray" or m.startswith("ray.") for m in imports_of(path, name))
    )  # fmt: skip
    assert offenders == []
    assert any("ray" in imports_of(path, name) or any(m.startswith("ray.") for m in imports_of(path, name))
               for name, path in files.items() if name.startswith(RAY_ONLY_IN))  # fmt: skip


# --- the checker itself catches what it is for -------------------------------------------------


def test_the_checker_finds_a_circle_and_an_upward_import():
    edges = {
        "rlvr.trainer.algorithm.batch": {"rlvr.trainer.algorithm.rollout"},
        "rlvr.trainer.algorithm.rollout": {"rlvr.trainer.bookkeeping.metrics"},
        "rlvr.trainer.bookkeeping.metrics": {"rlvr.trainer.algorithm.batch"},
    }
    assert find_cycle(edges) == [
        "rlvr.trainer.algorithm.batch", "rlvr.trainer.algorithm.rollout", "rlvr.trainer.bookkeeping.metrics",
        "rlvr.trainer.algorithm.batch",
    ]  # fmt: skip
    assert violations(edges) == [
        "rlvr.trainer.algorithm.rollout (algorithm) imports rlvr.trainer.bookkeeping.metrics (bookkeeping), "
        "a higher layer"
    ]


@pytest.mark.parametrize(
    ("src", "dst", "why"),
    [
        ("rlvr.trainer.cluster.loop", "rlvr.trainer.pipeline.loop", "the loops do not import one another"),
        ("rlvr.trainer.step", "rlvr.trainer.run", "a higher layer"),
        ("rlvr.envs.base", "rlvr.trainer.config", "a higher layer"),
        ("rlvr.verifiers.math", "rlvr.datasets.loaders", "stand apart"),
    ],
)
def test_the_checker_names_each_kind_of_wrong_import(src, dst, why):
    (found,) = violations({src: {dst}})
    assert why in found and src in found and dst in found


def test_imports_are_read_inside_functions_and_relative_ones_resolved(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from rlvr.trainer.step import Player\n\nfrom . import sibling\nfrom .. import up\n")
    got = imports_of(path, "rlvr.trainer.engines.m")
    assert {"rlvr.trainer.step", "rlvr.trainer.engines.sibling", "rlvr.trainer.up"} <= got
