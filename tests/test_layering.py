"""The package's layering: no import cycles, and no module importing a layer above its own.

    core (records, models, density, policies) <- config <- Kafka layer <- stages <- commands

Every import counts, the ones inside functions too (they are how heavy modules are kept off
the CLI's start-up path, not a way around the layering). Pure AST: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "streamfilter"

# (layer, module prefixes); a module belongs to the layer of its longest matching prefix.
LAYERS = (
    (0, ("streamfilter", "streamfilter.errors")),
    (1, ("streamfilter.records", "streamfilter.corpus", "streamfilter.shards", "streamfilter.policies",
         "streamfilter.models", "streamfilter.density")),
    (2, ("streamfilter.config",)),
    (3, ("streamfilter.metrics", "streamfilter.kafka_clients", "streamfilter.kafka_loop", "streamfilter.broker")),
    (4, ("streamfilter.stages", "streamfilter.daemon", "streamfilter.replay")),
    (5, ("streamfilter.commands", "streamfilter.__main__")),
)
LAYER_NAMES = {0: "base", 1: "core", 2: "config", 3: "Kafka layer", 4: "stages", 5: "commands"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    out.add(submodule)  # `from streamfilter import metrics` imports the module metrics
                elif source in known:
                    out.add(source)
    out.discard(name)
    return out


def layer_of(module: str) -> int:
    best, layer = -1, None
    for number, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), number
    if layer is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return layer


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(f"{name} ({LAYER_NAMES[layer_of(name)]}) imports {target} ({LAYER_NAMES[layer_of(target)]})"
                    for name, targets in graph().items() for target in targets
                    if layer_of(target) > layer_of(name))
    assert upward == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The walk itself: a core module importing a command, and two modules importing each other."""
    fake = {"streamfilter.density.x": "from streamfilter.commands import main\nimport streamfilter.density.y\n",
            "streamfilter.density.y": "def f():\n    from streamfilter.density import x\n",
            "streamfilter.commands": ""}
    known = set(fake)
    edges = {}
    for name, text in fake.items():
        path = tmp_path / (name.replace(".", "_") + ".py")
        path.write_text(text)
        edges[name] = imports(name, path, known)
    assert cycles(edges) == [["streamfilter.density.x", "streamfilter.density.y"]]
    assert layer_of("streamfilter.commands") > layer_of("streamfilter.density.x")
    assert "streamfilter.commands" in edges["streamfilter.density.x"]


@pytest.mark.parametrize("module", ["streamfilter.records", "streamfilter.density.race", "streamfilter.policies",
                                    "streamfilter.models.manifest"])
def test_core_modules_import_nothing_above_the_core(module):
    found = modules()
    assert {layer_of(t) for t in imports(module, found[module], set(found))} <= {0, 1}
