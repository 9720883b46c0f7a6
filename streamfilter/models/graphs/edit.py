"""ONNX protobuf editing shared by the graph heads and the variants (export time only; needs `onnx`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from streamfilter.errors import UserError

# Protobuf cannot hold more than 2 GB: larger models keep weights in a side file.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def replace_repeated(repeated, items) -> None:
    """Set a protobuf repeated field to `items` (copied first: deleting detaches the originals)."""
    copies = []
    for item in items:
        c = type(item)()
        c.CopyFrom(item)
        copies.append(c)
    del repeated[:]
    repeated.extend(copies)


def add_const(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def find_value(graph_io, name: str, what: str):
    found = [v for v in graph_io if v.name == name]
    if not found:
        raise UserError(f"exported {what} graph has no {name!r} (has {', '.join(v.name for v in graph_io)})")
    return found[0]


def prune(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """Keep only the nodes and initializers on a path from `inputs` to `outputs`."""
    g = model.graph
    producer = {out: idx for idx, n in enumerate(g.node) for out in n.output}
    needed_values, kept, stack = set(outputs), set(), list(outputs)
    while stack:
        idx = producer.get(stack.pop())
        if idx is None or idx in kept:
            continue
        kept.add(idx)
        for name in g.node[idx].input:
            if name and name not in needed_values:
                needed_values.add(name)
                stack.append(name)
    nodes = [n for idx, n in enumerate(g.node) if idx in kept]  # original (topological) order
    replace_repeated(g.node, nodes)
    inits = [i for i in g.initializer if i.name in needed_values]
    replace_repeated(g.initializer, inits)
    graph_inputs = [i for i in g.input if i.name in inputs]
    replace_repeated(g.input, graph_inputs)
    vi = [v for v in g.value_info if v.name in needed_values]
    replace_repeated(g.value_info, vi)
    return model


def dedupe_initializers(model: onnx.ModelProto, min_bytes: int = 1024) -> int:
    """Merge byte-identical initializers (T5's encoder and decoder graphs each carry the shared
    embedding). Returns the number of bytes saved."""
    g = model.graph
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep, saved = [], 0
    for init in g.initializer:
        raw = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
        if len(raw) < min_bytes:
            keep.append(init)
            continue
        key = (init.data_type, tuple(init.dims), hashlib.sha256(raw).digest())
        if key in seen:
            rename[init.name] = seen[key]
            saved += len(raw)
        else:
            seen[key] = init.name
            keep.append(init)
    if not rename:
        return 0
    replace_repeated(g.initializer, keep)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return saved


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save `model`; above ~2 GB the weights go to `<name>_data`. Returns the file names written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES:
        data_name = path.name + "_data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [path.name, data_name]
    onnx.save_model(model, str(path))
    return [path.name]


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain (ai.onnx) opset the graph was exported with."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
