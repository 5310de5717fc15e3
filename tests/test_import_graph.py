"""The package's modules import each other without circles (checked statically, function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import safeunits

# subpackages whose modules must form no import circle among themselves; ("safeunits",) checks the whole package
ACYCLIC = ("safeunits",)  # the whole package: no import circles anywhere

ROOT = Path(safeunits.__file__).parent


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("safeunits",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (module level, functions, TYPE_CHECKING)."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import: resolve against the importing package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]], keep: tuple[str, ...]) -> list[list[str]]:
    """Import circles: strongly connected components of two or more modules under `keep` (Tarjan)."""
    nodes = [n for n in graph if any(n == k or n.startswith(k + ".") for k in keep)]
    inside = set(nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v] & inside:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert not cycles(graph, ACYCLIC), "import circles (break them by moving the shared piece into its own module)"


def test_cycle_finder_finds_a_planted_circle():
    """The checker itself: a circle through a function-level import is found, a chain is not."""
    source = {"safeunits.units.a": {"safeunits.units.b"}, "safeunits.units.b": {"safeunits.units.c"},
              "safeunits.units.c": {"safeunits.units.a"}, "safeunits.units.d": {"safeunits.units.a"},
              "safeunits.eval.x": {"safeunits.units.d"}}
    assert cycles(source, ("safeunits.units",)) == [["safeunits.units.a", "safeunits.units.b", "safeunits.units.c"]]
    source["safeunits.units.c"] = set()
    assert cycles(source, ("safeunits.units",)) == []
    # the real graph sees function-level imports: units.transfer imports units.plots only inside write_transfer
    assert "safeunits.units.plots" in import_graph()["safeunits.units.transfer"]


def is_cli_module(name: str) -> bool:
    """The command-line layer: `safeunits.cli`, `safeunits.cli_options`, `safeunits.commands.*` and `__main__`."""
    return (name in ("safeunits.cli", "safeunits.cli_options", "safeunits.__main__")
            or name == "safeunits.commands" or name.startswith("safeunits.commands."))


def test_library_never_imports_the_cli():
    """The CLI imports the library, never the reverse: config helpers live in safeunits.config, not cli_options;
    the commands live in safeunits.commands (above every layer they drive), not in the library's subpackages."""
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if is_cli_module(t))
                 for name, targets in graph.items() if not is_cli_module(name)}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert not [name for name in graph if name.endswith(".cli") and name != "safeunits.cli"]
    # the check sees such an import: the CLI modules themselves do import cli_options
    assert "safeunits.cli_options" in graph["safeunits.commands.eval"]
