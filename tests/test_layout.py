"""The package layout (docs/architecture.md): the library never imports a command or argparse, no
import cycles (module level or inside functions), no private name imported across modules, no
module over 500 lines. Read from the source with ast, so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nearid_metric"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """Every import in ``path`` at any depth: (module, names taken from it, line). A ``from X import Y``
    where ``X.Y`` is a module of the package counts as importing ``X.Y``; relative imports are resolved.
    Imports under ``if TYPE_CHECKING:`` are left out: they never run."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for stmt in node.body for inner in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in known else (base, [alias.name], node.lineno))
    return found


def with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        targets = {parent for target, _, _ in imports(path, known) for parent in with_parents(target)}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def is_library(module: str) -> bool:
    """Commands (``nearid_metric.cli``) and ``python -m`` entry points (``__main__``) are not library modules."""
    return not (module == "nearid_metric.cli" or module.startswith("nearid_metric.cli.")
                or module.endswith(".__main__"))


def test_the_checks_see_what_they_check():
    """The walker finds imports inside functions and resolves submodules; the cycle finder finds a cycle."""
    graph = import_graph()
    assert "nearid_metric.cli.score" in graph and "nearid_metric.train.loop" in graph
    assert "nearid_metric.cli.common" in graph["nearid_metric.cli.score"]
    assert "nearid_metric.bench" in graph["nearid_metric.train.data"]
    assert "nearid_metric.protocol" in graph["nearid_metric.similarity"]
    # report imports matplotlib only inside a function; the walker still sees module-level and nested imports
    nested = imports(PACKAGE / "report.py", set(modules()))
    assert any(target == "matplotlib" for target, _, _ in nested)
    # the package's TYPE_CHECKING imports are not edges; its one run-time import is
    assert graph["nearid_metric"] == {"nearid_metric._version"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert not is_library("nearid_metric.cli.score") and not is_library("nearid_metric.train.__main__")
    assert is_library("nearid_metric.train.loop")


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", [m for m in modules() if is_library(m)])
def test_library_imports_no_command_and_no_argparse(module):
    bad = [f"line {line}: {target}" for target, _, line in imports(modules()[module], set(modules()))
           if target == "argparse" or not is_library(target) and target.startswith("nearid_metric.")]
    assert not bad, f"{module} imports a command or argparse: {bad}"


def test_no_private_name_imported_across_modules():
    bad = []
    for module, path in modules().items():
        for target, names, line in imports(path, set(modules())):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.startswith("nearid_metric") and private:
                bad.append(f"{module} line {line}: {', '.join(private)} from {target}")
    assert not bad, bad


def test_no_module_over_the_line_limit():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
