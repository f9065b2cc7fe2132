"""The dependency rule of docs/architecture.md, checked from the source: no import cycles, no upward imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hidream_ft", "launch")


def read_layers(doc: Path = REPO / "docs" / "architecture.md") -> dict[str, int]:
    """``{module prefix: layer}`` from the numbered lines of the fenced block under '## Dependency rule'."""
    section = doc.read_text().split("## Dependency rule", 1)[1]
    block = section.split("```", 2)[1]
    layers = {}
    for line in block.splitlines():
        match = re.match(r"\s*(\d+)\s+(\S.*?)\s*(#.*)?$", line)
        if match:
            for name in match.group(2).split():
                layers[name] = int(match.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def layer_of(module: str, layers: dict[str, int]) -> tuple[str, int] | None:
    """The most specific declared prefix of ``module`` and its layer."""
    candidates = [p for p in layers if module == p or module.startswith(p + ".")]
    if not candidates:
        return None
    prefix = max(candidates, key=len)
    return prefix, layers[prefix]


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports into the same or a higher layer from another unit of the rule (one unit may import itself)."""
    problems = []
    for importer, imported in graph.items():
        src = layer_of(importer, layers)
        for target in sorted(imported):
            dst = layer_of(target, layers)
            if src is None or dst is None or src[0] == dst[0]:
                continue
            if dst[1] >= src[1]:
                problems.append(f"{importer} (layer {src[1]}) imports {target} (layer {dst[1]})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    layers = read_layers()
    unplaced = [m for m in source_modules() if layer_of(m, layers) is None and m not in PACKAGES]
    assert not unplaced, f"modules missing from docs/architecture.md's dependency rule: {unplaced}"


def test_no_import_runs_back_up():
    problems = upward_imports(import_graph(source_modules()), read_layers())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    found = cycles(import_graph(source_modules()))
    assert not found, f"import cycles: {found}"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    layers = {"pkg.low": 0, "pkg.high": 1, "pkg.peer": 1}
    graph = {"pkg.low.a": {"pkg.high.b"}, "pkg.high.b": {"pkg.low.a"}, "pkg.peer": {"pkg.high.b"}}
    assert cycles(graph) == [["pkg.high.b", "pkg.low.a"]]
    assert upward_imports(graph, layers) == [
        "pkg.low.a (layer 0) imports pkg.high.b (layer 1)", "pkg.peer (layer 1) imports pkg.high.b (layer 1)",
    ]
