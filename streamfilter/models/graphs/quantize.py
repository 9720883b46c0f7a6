"""Variants of an exported fp32 graph (export time only; needs `onnx`): int8 for CPU, fp16/bf16 for GPU.

- `quantize_int8`: onnxruntime's dynamic int8 (per-channel weights), or for graphs whose
  weights live in a side file `quantize_int8_streaming`, one weight matrix at a time.
- `lm_head_nodes`, `down_projection_nodes`: the MatMuls kept fp32 (the full-vocabulary
  normaliser; LLM outlier activations).
- `mixed_precision`: the matmuls that tolerate 16 bits in fp16 or bf16, the rest fp32.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamfilter.errors import UserError
from streamfilter.models.graphs import edit
from streamfilter.models.graphs.edit import replace_repeated


def lm_head_nodes(model: onnx.ModelProto, vocab_size: int) -> list[str]:
    """Names of MatMul nodes whose weight has a vocabulary-sized output dimension (the LM head)."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and any(shapes.get(x, (None,))[-1] == vocab_size for x in n.input)]


def down_projection_nodes(model: onnx.ModelProto, vocab_size: int) -> list[str]:
    """Names of MatMul nodes that project a wider activation back into the residual stream
    (weight [K, hidden] with K > hidden: the feed-forward down projections). Their inputs carry
    the outlier features of LLMs that per-tensor int8 activations cannot hold. The hidden size
    is read off the LM head's weight [hidden, vocab]."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    heads = [shapes[x] for n in model.graph.node if n.op_type == "MatMul" for x in n.input
             if len(shapes.get(x, ())) == 2 and shapes[x][1] == vocab_size]
    if not heads:
        raise UserError(f"no LM head (a [hidden, {vocab_size}] MatMul weight) in the graph")
    hidden = heads[0][0]
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2
            and len(shapes.get(n.input[1], ())) == 2 and shapes[n.input[1]][1] == hidden and shapes[n.input[1]][0] > hidden]


def quantize_int8(src: Path, dst: Path, *, exclude_nodes: Sequence[str] = ()) -> list[str]:
    """Dynamic int8 quantization (weights int8, activations quantized per batch at run time) for CPU.

    Weights are quantized per output channel (mean cosine of MiniLM embeddings to fp32:
    0.994 per channel vs 0.956 per tensor). Only weight MatMuls and embedding Gathers are quantized; attention score matmuls and
    the nodes in `exclude_nodes` (the LM head: it sets the full-vocabulary normaliser)
    stay fp32.
    """
    import logging

    # A graph whose weights live in a side file is small itself: count the side files too.
    side = [f for f in src.parent.glob(src.name + "*") if f != src] + list(src.parent.glob(src.stem + ".onnx_data"))
    big = src.stat().st_size + sum(f.stat().st_size for f in set(side)) > edit.EXTERNAL_DATA_THRESHOLD_BYTES
    if big:
        return quantize_int8_streaming(src, dst, exclude_nodes=exclude_nodes)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizer logs one INFO line per tensor on the root logger
    try:
        _quantize(src, dst, exclude_nodes)
    finally:
        root.setLevel(level)
    return [dst.name]


def _quantize(src: Path, dst: Path, exclude_nodes: Sequence[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        model_input=str(src), model_output=str(dst), weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=list(exclude_nodes),
        extra_options={"MatMulConstBOnly": True},
    )


def quantize_int8_streaming(src: Path, dst: Path, *, exclude_nodes: Sequence[str] = (), method: str = "dynamic",
                            block_size: int = 32) -> list[str]:
    """int8 variant of a graph too big for onnxruntime's quantizer, one weight at a time.

    `quantize_dynamic` holds the whole model several times over (more than 20 GB for a 7 GB
    Qwen2.5-1.5B graph). Here each weight MatMul's matrix is read alone (from its offset in
    the side file), quantized per output column the way `quantize_dynamic` does for QInt8
    (symmetric, scale = max|w| / 127, zero point 0), appended to `<dst>.data`, and the MatMul
    becomes one com.microsoft `DynamicQuantizeMatMul` (activations quantized per batch at run
    time: the node onnxruntime fuses `quantize_dynamic`'s output into). Nodes in
    `exclude_nodes`, embedding Gathers, norms and biases stay fp32 and keep pointing at the
    source's side file, so `dst` must sit beside `src`. Peak memory is one weight matrix.
    Returns the files the variant reads: `dst`, its data file, and the source side files it shares.
    """
    if dst.parent.resolve() != src.parent.resolve():
        raise UserError(f"{dst}: the int8 graph shares {src.name}'s side file and must be written beside it")
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    excluded = set(exclude_nodes)
    data_name = dst.name + ".data"
    done: dict[str, tuple[list[str], str, dict]] = {}  # fp32 weight -> (its inputs, op type, attributes)
    added: list[TensorProto] = []
    nodes = []
    with open(dst.parent / data_name, "wb") as data:
        for node in g.node:
            weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if (weight is None or node.name in excluded or len(weight.dims) != 2
                    or weight.data_type != TensorProto.FLOAT):
                nodes.append(node)
                continue
            if weight.name not in done:
                w = _read_weight(weight, src.parent)
                if method == "dynamic":
                    q, scale = _int8_per_column(w)
                    names = [f"{weight.name}_int8", f"{weight.name}_scale", f"{weight.name}_zero_point"]
                    added += [_append_external(q, names[0], data, data_name),
                              numpy_helper.from_array(scale, names[1]),
                              numpy_helper.from_array(np.zeros_like(q[0]), names[2])]
                    done[weight.name] = (names, "DynamicQuantizeMatMul", {})
                else:
                    q, scale = _int8_blocks(w, block_size)
                    names = [f"{weight.name}_int8_blocks", f"{weight.name}_block_scales"]
                    added += [_append_external(q, names[0], data, data_name), numpy_helper.from_array(scale, names[1])]
                    done[weight.name] = (names, "MatMulNBits", dict(K=w.shape[0], N=w.shape[1], bits=8,
                                                                    block_size=block_size, accuracy_level=4))
            names, op_type, attributes = done[weight.name]
            nodes.append(helper.make_node(op_type, [node.input[0], *names], list(node.output), name=node.name + "_int8",
                                          domain="com.microsoft", **attributes))
    used = {x for n in nodes for x in n.input} | {x for n in nodes for a in n.attribute if a.g for x in _subgraph_inputs(a.g)}
    replace_repeated(g.node, nodes)
    replace_repeated(g.initializer, [i for i in g.initializer if i.name in used] + added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(dst))
    shared = sorted({e.value for i in g.initializer for e in i.external_data if e.key == "location"} - {data_name})
    return [dst.name, data_name, *shared]


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    return {x for n in graph.node for x in n.input} | {x for n in graph.node for a in n.attribute if a.g
                                                       for x in _subgraph_inputs(a.g)}


def _read_weight(tensor: TensorProto, base: Path) -> np.ndarray:
    """An fp32 initializer's values; a side file's are read alone (not the whole file)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    count = int(np.prod(tensor.dims))
    values = np.fromfile(base / info["location"], dtype="<f4", count=count, offset=int(info.get("offset", 0)))
    if values.size != count:
        raise UserError(f"{base / info['location']}: {tensor.name} is cut short ({values.size} of {count} values)")
    return values.reshape(tuple(tensor.dims))


def _int8_per_column(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a [in, out] matrix: q = round(w / scale), scale = max|w| / 127."""
    absmax = np.abs(w).max(axis=0)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _int8_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' 8-bit layout of a [K, N] matrix: per column, blocks of `block_size` along K,
    symmetric (scale = max|w| / 127 per block), by onnxruntime's own packing kernel."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    k, n = w.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:
        w = np.pad(w, ((0, blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, blocks, block_size), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, blocks), dtype=np.uint8)
    quantize_matmul_8bits(packed, np.ascontiguousarray(w, dtype=np.float32), scales, zero_points, block_size, n, k, True)
    return packed, scales


def _append_external(values: np.ndarray, name: str, data, data_name: str) -> TensorProto:
    """A tensor whose bytes are appended (4 KiB aligned) to the open side file `data`."""
    pad = -data.tell() % 4096
    data.write(b"\0" * pad)
    offset = data.tell()
    raw = np.ascontiguousarray(values).tobytes()
    data.write(raw)
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(values.dtype), dims=values.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
        t.external_data.add(key=key, value=value)
    return t


# Matmuls that may run in 16-bit: attention projections and the feed-forward input. T5's
# activations overflow fp16 in the feed-forward output projection `wo` and in the residual
# stream it feeds (the reason transformers keeps `wo` in fp32), so those, the norms and the
# softmaxes stay fp32.
HALF_MATMUL = re.compile(r"/(SelfAttention|EncDecAttention)/(q|k|v|o)/MatMul$|/DenseReluDense/wi(_0|_1)?/MatMul$")


def mixed_precision(model: onnx.ModelProto, dtype: str = "float16", pattern: re.Pattern = HALF_MATMUL) -> tuple[onnx.ModelProto, int]:
    """Copy of `model` where weight MatMuls whose node name matches `pattern` run in `dtype`
    ("float16" or "bfloat16"), with casts around them; everything else stays fp32.
    Returns the model and the number of MatMuls converted."""
    to = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, converted = [], 0
    half_weights: dict[str, str] = {}
    for node in g.node:
        weight = next((x for x in node.input if x in inits), None)
        if node.op_type != "MatMul" or weight is None or not pattern.search(node.name):
            new_nodes.append(node)
            continue
        if weight not in half_weights:
            w32 = numpy_helper.to_array(inits[weight]).astype(np.float32)
            half_name = f"{weight}/{dtype}"
            if dtype == "float16":
                g.initializer.append(numpy_helper.from_array(w32.astype(np.float16), half_name))
            else:
                bits = w32.view(np.uint32).astype(np.uint64)
                rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
                t = helper.make_tensor(half_name, TensorProto.BFLOAT16, w32.shape, rounded.tobytes(), raw=True)
                g.initializer.append(t)
            half_weights[weight] = half_name
        data_in = node.input[0] if node.input[1] == weight else node.input[1]
        cast_in, mm_out = f"{node.name}/cast_in", f"{node.name}/half_out"
        inputs = [cast_in, half_weights[weight]] if node.input[1] == weight else [half_weights[weight], cast_in]
        new_nodes.append(helper.make_node("Cast", [data_in], [cast_in], to=to, name=f"{node.name}/CastIn"))
        new_nodes.append(helper.make_node("MatMul", inputs, [mm_out], name=node.name))
        new_nodes.append(helper.make_node("Cast", [mm_out], [node.output[0]], to=TensorProto.FLOAT, name=f"{node.name}/CastOut"))
        converted += 1
    replace_repeated(g.node, new_nodes)
    # fp32 weights now unused by any node are dropped.
    used = {x for n in g.node for x in n.input}
    kept = [i for i in g.initializer if i.name in used]
    replace_repeated(g.initializer, kept)
    del g.value_info[:]  # shapes/dtypes changed; ORT re-infers
    return out, converted
