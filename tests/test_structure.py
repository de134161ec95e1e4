"""The layout holds: project modules import each other without cycles, at the
top of the module (a function-level import of a project module hides a cycle),
and each layer imports only the layers below it. Read from the source (AST),
so it holds for every module, imported by a test or not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "models", "deployments")
# Function-level imports of project modules that are allowed, and why. A heavy,
# optional dependency loaded only when the feature is used is the one reason.
DEFERRED_IMPORTS = {
    ("flows/runners.py", "flows.dask_shards"): "dask/distributed load only for --workers or --cluster",
}
# Which layer may import which: models at the bottom, then tasks, flows, deployments,
# and the command line (flows/cli) on top of them all.
LAYERS = {"models": set(), "tasks": {"models"}, "flows": {"models", "tasks"},
          "deployments": {"models", "tasks", "flows"}, "cli": {"models", "tasks", "flows", "deployments"}}


def layer_of(module: str) -> str:
    return "cli" if module == "flows.cli" or module.startswith("flows.cli.") else module.split(".")[0]


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = project_modules()


def imported_modules(node: ast.Import | ast.ImportFrom, current: str) -> list[str]:
    """Project modules an import statement loads (`from a.b import c` loads a.b.c when c is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
    if node.level:  # relative imports are not used in this project
        raise AssertionError(f"{current}: relative import")
    if node.module is None or node.module.split(".")[0] not in PACKAGES:
        return []
    found = []
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.append(sub if sub in MODULES else node.module)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> project modules it imports at module level, [(file, module, line)] imported inside functions)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    deferred = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported_modules(node, name)
            if id(node) in top:
                graph[name] |= {t for t in targets if t in MODULES and t != name}
            elif not _under_type_checking(tree, node):
                deferred += [(str(path.relative_to(ROOT)), t, node.lineno) for t in targets]
    return graph, deferred


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for block in tree.body:
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
            if any(n is node for n in ast.walk(block)):
                return True
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # importing a package runs its __init__ only: a submodule's import of its package is no edge back
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_project_modules_import_each_other_without_a_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_project_modules_are_imported_at_the_top_of_a_module():
    _, deferred = import_graph()
    unexplained = [(f, m, line) for f, m, line in deferred if (f, m) not in DEFERRED_IMPORTS]
    assert not unexplained, "function-level imports of project modules (move them to the top, or name the heavy " \
                            f"optional dependency in DEFERRED_IMPORTS): {unexplained}"


def test_each_layer_imports_only_the_layers_below_it():
    graph, _ = import_graph()
    wrong = [(a, b) for a, targets in graph.items() for b in targets
             if layer_of(b) != layer_of(a) and layer_of(b) not in LAYERS[layer_of(a)]]
    assert not wrong, f"imports against the layers (models < tasks < flows < deployments < flows.cli): {wrong}"


def test_the_plain_data_module_imports_no_stage():
    graph, _ = import_graph()
    assert graph["tasks.records"] == set(), f"tasks/records.py imports {graph['tasks.records']}"


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_every_benchmark_script_imports():
    """The benchmarks are how speed goals are shown; a rename in the library must
    not leave one that no longer starts (two did, after this layout changed).
    Imported, not run: each guards its work behind `__main__`."""
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    code = ("import importlib, sys\n"
            f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]\n"
            f"for name in {scripts!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as exc:\n"
            "        print(f'{name}: {type(exc).__name__}: {exc}')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr[-2000:]
