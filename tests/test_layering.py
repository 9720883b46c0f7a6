"""The package's layering: no import cycles, and no module importing a layer above its own.

    core (records, models, density, policies) <- config <- Kafka layer <- stages <- commands

Every import counts, the ones inside functions too (they are how heavy modules are kept off
the CLI's start-up path, not a way around the layering). Pure AST: nothing is imported.
"""

from __future__ import annotations

import pytest
from import_graph import PACKAGE_DIR, find_cycle, graph, imports, modules

# (layer, module prefixes); a module belongs to the layer of its longest matching prefix (the package
# itself, `streamfilter`, only by name: it is not a prefix of everything).
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


def layer_of(module: str) -> int:
    best, layer = -1, None
    for number, prefixes in LAYERS:
        for prefix in prefixes:
            matches = module == prefix or (prefix != "streamfilter" and module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, layer = len(prefix), number
    if layer is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return layer


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


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
    assert find_cycle(edges) == ["streamfilter.density.x", "streamfilter.density.y", "streamfilter.density.x"]
    assert layer_of("streamfilter.commands") > layer_of("streamfilter.density.x")
    assert "streamfilter.commands" in edges["streamfilter.density.x"]


@pytest.mark.parametrize("module", ["streamfilter.records", "streamfilter.density.race", "streamfilter.policies",
                                    "streamfilter.models.manifest"])
def test_core_modules_import_nothing_above_the_core(module):
    found = modules()
    assert {layer_of(t) for t in imports(module, found[module], set(found))} <= {0, 1}


def test_the_readme_code_map_names_every_module():
    """README's "Code map" stays true: a new module (or a renamed one) must be named there."""
    readme = (PACKAGE_DIR.parent / "README.md").read_text(encoding="utf-8")
    code_map = readme[readme.index("### Code map"):]
    missing = sorted(name for name, path in modules().items()
                     if path.stem not in ("__init__", "__main__") and path.stem not in code_map)
    assert missing == []
