"""The package's layout rules (DESIGN.md): imports go one way, with no cycles anywhere.

The graph is read from the source (every ``import`` statement, those inside functions too: a
function-level import that closes a cycle only postpones the knot), for ``llama_kernels``,
``benchmarks`` and ``tools``.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama_kernels", "benchmarks", "tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imported(module: str, is_package: bool, node, known) -> list:
    """The known modules an import statement names (``from a import b``: ``a.b`` if it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    found = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


@pytest.fixture(scope="module")
def graph():
    sources = _sources()
    edges = {}
    for module, path in sources.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[module] = {dep for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for dep in _imported(module, path.name == "__init__.py", node, sources)}
    return edges


def _cycles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles(graph):
    assert graph["llama_kernels.cli"], "the import graph was not read"
    assert _cycles(graph) == []


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_imports_go_one_way(graph):
    broken = []
    for module, deps in graph.items():
        for dep in deps:
            if _within(module, "llama_kernels.ops") and not (_within(dep, "llama_kernels.ops")
                                                             or dep == "llama_kernels.reference"):
                broken.append((module, dep, "ops import only ops and their eager twins"))
            if module == "llama_kernels.model" and dep != "llama_kernels.reference":
                broken.append((module, dep, "the reference model uses the reference ops only"))
            if _within(module, "llama_kernels.integrations") and dep == "llama_kernels.patch":
                broken.append((module, dep, "patch applies the integrations, not the other way"))
            if _within(module, "llama_kernels") and _within(dep, "benchmarks") and module != "llama_kernels.cli":
                broken.append((module, dep, "the package needs no benchmark (only `llama-kernels bench` runs them)"))
            if _within(module, "llama_kernels") and _within(dep, "tools"):
                broken.append((module, dep, "tools are scripts over the package"))
    assert broken == []
