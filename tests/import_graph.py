"""The package's import graph, read from source (AST; nothing is imported): for the layering tests.

Every import counts: at the top, inside functions, under TYPE_CHECKING, and the lazy ones a
package's `__getattr__` names as strings (`importlib.import_module("streamfilter.models.askllm")`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "streamfilter"


def modules(under: str = "streamfilter") -> dict[str, Path]:
    """{dotted name: file} of every module whose name is `under` or starts with `under.`."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name == under or name.startswith(under + "."):
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` (in file `path`) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    source_text = path.read_text(encoding="utf-8")
    lazy = "import_module" in source_text  # module names as strings are imports only where they are imported by name
    out = set()
    for node in ast.walk(ast.parse(source_text, str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    out.add(f"{source}.{alias.name}")  # `from streamfilter import metrics`: the module
                elif source in known:
                    out.add(source)
        elif lazy and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            out.add(node.value)  # a lazy import by name
    out.discard(name)
    return out


def graph(under: str = "streamfilter") -> dict[str, set[str]]:
    found = modules(under)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None
