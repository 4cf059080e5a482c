"""The import contracts, read from the source (every import statement, also those inside
functions and under TYPE_CHECKING): library at the bottom, tasks above, flows on top; the library
never imports the orchestrator, the tracker or the config system; stage modules are independent
of each other; no import cycle anywhere. `make lint` runs this file."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bonsai", "tasks", "flows")
LAYER = {"bonsai": 0, "tasks": 1, "flows": 2}
# What the library must never import: it is usable and testable without them.
NOT_IN_LIBRARY = ("prefect", "mlflow", "hydra", "omegaconf", "tasks", "flows")
# Modules of bonsai/stages/ that every stage may import; the others are stages themselves.
STAGE_SHARED = {"bonsai.stages", "bonsai.stages.base", "bonsai.stages.common",
                "bonsai.stages.quantize_common"}  # fmt: skip


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> every module name it imports (absolute, as written or resolved from relative)."""
    out: dict[str, set[str]] = defaultdict(set)
    for name, path in _modules(root).items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out[name].update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                out[name].add(base)
                out[name].update(f"{base}.{a.name}" for a in node.names)
    return out


def internal_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import name` of a submodule counts
    as importing that submodule)."""
    mods = _modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, targets in imports(root).items():
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    nodes = set(graph) | {t for ts in graph.values() for t in ts}
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycle():
    assert cycles(internal_graph()) == []


def test_the_cycle_check_finds_a_cycle_made_by_imports_inside_functions(tmp_path):
    """The check can fail: two modules that import each other inside functions are a cycle."""
    pkg = tmp_path / "bonsai"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from bonsai.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n")
    for other in ("tasks", "flows"):
        (tmp_path / other).mkdir()
    assert cycles(internal_graph(tmp_path)) == [["bonsai.a", "bonsai.b"]]


def test_layers_point_down_and_the_library_stays_free_of_orchestration():
    wrong = []
    for module, targets in imports().items():
        layer = LAYER[module.split(".")[0]]
        for t in targets:
            top = t.split(".")[0]
            if top in LAYER and LAYER[top] > layer:
                wrong.append(f"{module} imports {t} (a layer above it)")
            if module.startswith("bonsai") and top in NOT_IN_LIBRARY:
                wrong.append(f"{module} imports {t}")
    assert wrong == []


def test_stage_modules_import_no_other_stage():
    graph = internal_graph()
    wrong = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith("bonsai.stages.") and m not in STAGE_SHARED
        for t in targets
        if t.startswith("bonsai.stages.") and t not in STAGE_SHARED
    ]
    assert wrong == []


@pytest.mark.parametrize("module", ["bonsai.formats", "bonsai.build", "bonsai.stages"])
def test_the_library_imports_without_prefect_mlflow_or_hydra(module):
    """The same contract at run time, in a fresh interpreter: importing the library loads none
    of them (a lazy import the AST check saw through would still be caught here)."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('prefect', 'mlflow', 'hydra', 'omegaconf') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
