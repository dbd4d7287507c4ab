"""The package's import graph keeps its layering: every module imports, no import cycle, no import of another
package's private name, no import reaching up a layer.

Layers, lowest first: errors -> ops -> layers -> models -> applications -> CLI. A module may import its own layer
and the layers below it. The graph is read from the source (module-level and function-level imports alike), so an
import hidden inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

import mambakit

PACKAGE = "mambakit"
ROOT = Path(mambakit.__file__).parent

#: Layer of each top-level part of the package (the first name after "mambakit."). Modules named ``cli`` (and
#: ``__main__``) inside any part are the command line, the top layer.
LAYERS: Dict[str, int] = {
    "errors": 0,
    "ops": 1,
    "layers": 2,
    "models": 3,
    # applications
    "data": 4, "train": 4, "finetune": 4, "training": 4, "tasks": 4, "nd": 4, "remamba": 4, "interpret": 4,
    "distributed": 4,
    "io": 4, "compat": 4,
    # the command line
    "cli": 5, "__main__": 5,
}
CLI_LAYER = 5
LAYER_NAMES = {0: "errors", 1: "ops", 2: "layers", 3: "models", 4: "applications", 5: "CLI"}

#: KNOWN VIOLATIONS: (importer, imported module[, private name]) tolerated for now, each with the reason. None is
#: left; `test_known_violations_still_occur` fails on entries that no longer occur, so that the set only shrinks.
#: Nothing may be added to it for new code.
KNOWN_VIOLATIONS: Set[Tuple[str, ...]] = set()

#: KNOWN KERNEL CHOICES outside ops: (importer, kernel module). The same rule as KNOWN_VIOLATIONS: it only shrinks.
KNOWN_KERNEL_CHOICES: Set[Tuple[str, str]] = set()


# ----------------------------------------------------------------------------------------------------------------------
# Reading the graph
# ----------------------------------------------------------------------------------------------------------------------
def _modules() -> Dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    found = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], PACKAGE + "."):
        rel = info.name.split(".")[1:]
        path = ROOT.joinpath(*rel)
        found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _owner(name: str) -> str:
    """The package a module belongs to (a package owns itself)."""
    return name if _is_package(name) else name.rsplit(".", 1)[0]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _owner(importer).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> Iterator[Tuple[str, Optional[str], int]]:
    """(imported mambakit module, the name taken from it or None, line) for every import in a module's source."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield _nearest_module(alias.name), None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, node)
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # `from package import module`
                    yield sub, None, node.lineno
                else:
                    yield _nearest_module(source), alias.name, node.lineno


def _nearest_module(dotted: str) -> str:
    while dotted not in MODULES and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
    return dotted


def _layer(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) == 1:
        return None  # mambakit/__init__.py: the public facade, above everything
    if parts[-1] in ("cli", "__main__") or parts[1] == "cli":
        return CLI_LAYER
    return LAYERS.get(parts[1])


EDGES: Dict[str, List[Tuple[str, Optional[str], int]]] = {name: list(_imports(name)) for name in MODULES}


def _private(name: Optional[str]) -> bool:
    return name is not None and name.startswith("_") and not name.startswith("__")


def _cycles(graph: Optional[Dict[str, List[str]]] = None) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted; default graph: the modules."""
    if graph is None:
        graph = {m: sorted({t for t, _, _ in EDGES[m] if t != m and t in MODULES}) for m in MODULES}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith("__main__")))
def test_every_module_imports(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:  # an optional dependency of that module (Triton, matplotlib, ...)
        if error.name is not None and not error.name.startswith(PACKAGE):
            pytest.skip(f"{name} needs {error.name}")
        raise


def test_every_part_has_a_layer():
    unplaced = sorted({n.split(".")[1] for n in MODULES if "." in n and _layer(n) is None})
    assert not unplaced, f"add these parts of the package to LAYERS: {unplaced}"


def _violations() -> Dict[Tuple[str, ...], str]:
    """Every edge that breaks a rule: key (importer, imported[, name]) -> what is wrong."""
    found: Dict[Tuple[str, ...], str] = {}
    in_cycle = {m for component in _cycles() for m in component}
    for importer, edges in EDGES.items():
        for target, taken, line in edges:
            where = f"{MODULES[importer].relative_to(ROOT.parent)}:{line}"
            if importer in in_cycle and target in in_cycle and _reaches(target, importer):
                found[(importer, target)] = f"{where}: {importer} -> {target} is part of an import cycle"
            low, high = _layer(importer), _layer(target)
            if low is not None and high is not None and high > low:
                found[(importer, target)] = (f"{where}: {importer} ({LAYER_NAMES[low]}) imports {target} "
                                             f"({LAYER_NAMES[high]}), a layer above it")
            if _private(taken) and _owner(target) != _owner(importer):
                found[(importer, target, taken)] = f"{where}: {importer} imports the private {target}.{taken}"
            if taken is None and _private(target.rsplit(".", 1)[-1]) and _owner(target) != _owner(importer) \
                    and _owner(_owner(target)) != _owner(importer):
                found[(importer, target)] = f"{where}: {importer} imports the private module {target}"
    return found


def _reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        if v in seen:
            continue
        seen.add(v)
        todo.extend(t for t, _, _ in EDGES[v] if t in MODULES)
    return False


def test_no_cycle_no_up_import_no_private_import():
    found = _violations()
    new = sorted(text for key, text in found.items() if key not in KNOWN_VIOLATIONS)
    assert not new, "import rules broken:\n" + "\n".join(new)


def _part(name: str) -> str:
    parts = name.split(".")
    return "cli" if _layer(name) == CLI_LAYER else (parts[1] if len(parts) > 1 else PACKAGE)


def test_no_cycle_among_the_parts():
    """Between the top-level parts (ops, layers, models, each application, the CLI) imports go one way only."""
    known = {(_part(k[0]), _part(k[1])) for k in KNOWN_VIOLATIONS}
    graph: Dict[str, Set[str]] = {}
    for importer, edges in EDGES.items():
        for target, _, _ in edges:
            a, b = _part(importer), _part(target)
            if a != b and PACKAGE not in (a, b) and (a, b) not in known:
                graph.setdefault(a, set()).add(b)
                graph.setdefault(b, set())
    assert not _cycles({k: sorted(v) for k, v in graph.items()})


def test_known_violations_still_occur():
    gone = sorted(KNOWN_VIOLATIONS - set(_violations()))
    assert not gone, f"these known violations are fixed: remove them from KNOWN_VIOLATIONS: {gone}"


def _kernel_choices() -> Set[Tuple[str, str]]:
    """(importer, module) where layers or models import Triton kernels directly instead of an op's dispatcher."""
    return {(importer, target) for importer, edges in EDGES.items()
            if importer.split(".")[1:2] in (["layers"], ["models"])
            for target, _, _ in edges
            if target.startswith(PACKAGE + ".ops.triton") or target.split(".")[-1].startswith("triton")}


def test_layers_and_models_choose_no_kernels():
    """Layers and models reach the Triton kernels only through an op's public dispatcher."""
    found = _kernel_choices()
    assert found <= KNOWN_KERNEL_CHOICES, sorted(found - KNOWN_KERNEL_CHOICES)
    assert KNOWN_KERNEL_CHOICES <= found, f"fixed: remove from KNOWN_KERNEL_CHOICES: {KNOWN_KERNEL_CHOICES - found}"


def test_the_graph_reader_sees_function_level_imports():
    # ops dispatchers import their kernels inside functions: those edges are in the graph
    assert any(t == "mambakit.ops.ssd.triton" for t, _, _ in EDGES["mambakit.ops.ssd"])
