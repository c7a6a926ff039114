"""Imports in the package go one way: no module imports, at the top or inside a function, anything that
imports it back (`python -m pytest tests/test_layers.py` is the check; CI runs it with the suite)."""

import ast
from pathlib import Path

import asg

PACKAGE = Path(asg.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, counting imports inside functions too. Importing a
    submodule also runs its parent packages, which Python does for any import; those are not edges."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.split(".")[0] == "asg")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                elif node.module and node.module.split(".")[0] == "asg":
                    target = node.module
                else:
                    continue
                for alias in node.names:
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        edges.discard(name)
    return {name: {e for e in edges if e in modules} for name, edges in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
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


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "asg.checkpoint" in graph["asg.hf"] and "asg.format" in graph["asg.checkpoint"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_bottom_layers_import_nothing_above_them():
    graph = import_graph()
    for leaf in ("asg.bitpack", "asg._version", "asg.atomic", "asg.methods", "asg.kernels", "asg.twolevel"):
        assert graph[leaf] == set(), leaf
    assert graph["asg.format"] <= {"asg.bitpack"}
    assert graph["asg.lowdim"] <= {"asg.kernels"}
    assert graph["asg.pq"] <= {"asg.kernels", "asg.lowdim", "asg.twolevel"} and graph["asg.config"] <= {"asg.methods", "asg.format", "asg.bitpack"}
    assert graph["asg.modules"] <= {"asg.kernels", "asg.pq", "asg.config", "asg.methods", "asg.format", "asg.fastpaths",
                                    "asg.bitpack"}
    assert graph["asg.fastpaths"] <= {"asg.kernels"}
    for lower in ("asg.surgery", "asg.checkpoint", "asg.format", "asg.modules"):
        assert not graph[lower] & {"asg", "asg.hf", "asg.cli", "asg.tasks"}, lower


def test_a_cycle_would_be_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
