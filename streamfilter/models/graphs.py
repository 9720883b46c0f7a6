"""ONNX graph surgery on optimum's exports (export time only; needs `onnx`).

- `askllm_graph`: optimum's T5 encoder and decoder graphs joined into one graph
  `(input_ids, attention_mask) -> log_probs [batch, 2]`: the decoder input is the
  decoder start token made inside the graph, and the graph ends in a full-vocabulary
  log-softmax evaluated only at the "yes" and "no" ids (log-sum-exp and a gather), so
  no [batch, vocab] logits ever leave the device.
- `embedder_graph`: a sentence-transformers module list (pooling, Dense, Normalize)
  appended to the exported transformer's token embeddings.
- `dedupe_initializers`, `quantize_int8`, `mixed_precision`: variants.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamfilter.errors import UserError

ASKLLM_OUTPUT = "log_probs"
EMBEDDER_OUTPUT = "sentence_embedding"
# Protobuf cannot hold more than 2 GB: larger models keep weights in a side file.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def _replace(repeated, items) -> None:
    """Set a protobuf repeated field to `items` (copied first: deleting detaches the originals)."""
    copies = []
    for item in items:
        c = type(item)()
        c.CopyFrom(item)
        copies.append(c)
    del repeated[:]
    repeated.extend(copies)


def _const(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def _only(graph_io, name: str, what: str):
    found = [v for v in graph_io if v.name == name]
    if not found:
        raise UserError(f"exported {what} graph has no {name!r} (has {', '.join(v.name for v in graph_io)})")
    return found[0]


def askllm_graph(encoder: onnx.ModelProto, decoder: onnx.ModelProto, *, decoder_start_token_id: int,
                 yes_token_id: int, no_token_id: int) -> onnx.ModelProto:
    """One graph: encoder, one decoder step from the start token, log-softmax at [yes, no]."""
    _only(encoder.graph.input, "input_ids", "encoder")
    _only(encoder.graph.input, "attention_mask", "encoder")
    _only(encoder.graph.output, "last_hidden_state", "encoder")
    for name in ("input_ids", "encoder_hidden_states", "encoder_attention_mask"):
        _only(decoder.graph.input, name, "decoder")
    _only(decoder.graph.output, "logits", "decoder")
    if {o.domain: o.version for o in encoder.opset_import} != {o.domain: o.version for o in decoder.opset_import}:
        raise UserError("encoder and decoder graphs were exported with different opsets")

    dec = onnx.compose.add_prefix(decoder, "decoder/")
    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    g = model.graph
    g.name = "askllm"
    del g.output[:]
    g.initializer.extend(dec.graph.initializer)
    g.value_info.extend(dec.graph.value_info)

    # Decoder inputs made inside the graph: [batch, 1] start tokens, the encoder's mask and states.
    _const(g, "askllm/one", np.array([1], dtype=np.int64))
    _const(g, "askllm/zero_to_one_start", np.array([0], dtype=np.int64))
    g.node.extend([
        helper.make_node("Shape", ["input_ids"], ["askllm/input_shape"], name="askllm/Shape"),
        helper.make_node("Slice", ["askllm/input_shape", "askllm/zero_to_one_start", "askllm/one"],
                         ["askllm/batch"], name="askllm/Slice"),
        helper.make_node("Concat", ["askllm/batch", "askllm/one"], ["askllm/start_shape"], axis=0, name="askllm/Concat"),
        helper.make_node("ConstantOfShape", ["askllm/start_shape"], ["decoder/input_ids"], name="askllm/StartTokens",
                         value=numpy_helper.from_array(np.array([decoder_start_token_id], dtype=np.int64))),
        helper.make_node("Identity", ["attention_mask"], ["decoder/encoder_attention_mask"], name="askllm/Mask"),
        helper.make_node("Identity", ["last_hidden_state"], ["decoder/encoder_hidden_states"], name="askllm/States"),
    ])
    g.node.extend(dec.graph.node)
    # log P(token) = logit[token] - logsumexp(logits), in fp32 whatever the graph's dtype.
    _const(g, "askllm/vocab_axis", np.array([-1], dtype=np.int64))
    _const(g, "askllm/yes_no", np.array([yes_token_id, no_token_id], dtype=np.int64))
    _const(g, "askllm/step_axis", np.array([1], dtype=np.int64))
    g.node.extend([
        helper.make_node("Cast", ["decoder/logits"], ["askllm/logits32"], to=TensorProto.FLOAT, name="askllm/Cast"),
        # max + log(sum(exp(x - max))) spelled out: ORT's ReduceLogSumExp was measured
        # 6e-4 off in log space on a 32k vocabulary, larger than the parity budget.
        helper.make_node("ReduceMax", ["askllm/logits32", "askllm/vocab_axis"], ["askllm/max"], keepdims=1,
                         name="askllm/Max"),
        helper.make_node("Sub", ["askllm/logits32", "askllm/max"], ["askllm/shifted"], name="askllm/Shift"),
        helper.make_node("Exp", ["askllm/shifted"], ["askllm/exp"], name="askllm/Exp"),
        helper.make_node("ReduceSum", ["askllm/exp", "askllm/vocab_axis"], ["askllm/sum"], keepdims=1,
                         name="askllm/Sum"),
        helper.make_node("Log", ["askllm/sum"], ["askllm/log_sum"], name="askllm/Log"),
        helper.make_node("Add", ["askllm/max", "askllm/log_sum"], ["askllm/lse"], name="askllm/LogSumExp"),
        helper.make_node("Gather", ["askllm/logits32", "askllm/yes_no"], ["askllm/yes_no_logits"], axis=2,
                         name="askllm/GatherYesNo"),
        helper.make_node("Sub", ["askllm/yes_no_logits", "askllm/lse"], ["askllm/log_probs3"], name="askllm/Sub"),
        helper.make_node("Squeeze", ["askllm/log_probs3", "askllm/step_axis"], [ASKLLM_OUTPUT], name="askllm/Squeeze"),
    ])
    g.output.append(helper.make_tensor_value_info(ASKLLM_OUTPUT, TensorProto.FLOAT, ["batch_size", 2]))
    model = prune(model, ["input_ids", "attention_mask"], [ASKLLM_OUTPUT])
    onnx.checker.check_model(model, full_check=False)
    return model


@dataclass(frozen=True)
class DenseLayer:
    weight: np.ndarray  # [out, in], as torch.nn.Linear stores it
    bias: np.ndarray | None
    activation: str  # "identity" | "tanh"


POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")  # sentence-transformers' concatenation order


def embedder_graph(transformer: onnx.ModelProto, *, token_output: str, pooling_modes: Sequence[str],
                   dense: Sequence[DenseLayer]) -> onnx.ModelProto:
    """Token embeddings → masked pooling → Dense layers → L2 normalisation, as one graph.

    Output `sentence_embedding` [batch, dim] float32, unit L2 norm.
    """
    _only(transformer.graph.output, token_output, "transformer")
    for mode in pooling_modes:
        if mode not in POOLING_MODES:
            raise UserError(f"pooling mode {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    model = onnx.ModelProto()
    model.CopyFrom(transformer)
    g = model.graph
    del g.output[:]
    nodes = g.node
    p = "head/"
    _const(g, p + "seq_axis", np.array([1], dtype=np.int64))
    _const(g, p + "last_axis", np.array([-1], dtype=np.int64))
    _const(g, p + "eps_count", np.array(1e-9, dtype=np.float32))
    _const(g, p + "eps_norm", np.array(1e-12, dtype=np.float32))
    _const(g, p + "neg_big", np.array(-1e9, dtype=np.float32))
    nodes.extend([
        helper.make_node("Cast", [token_output], [p + "tokens"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], [p + "mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "mask_f", p + "last_axis"], [p + "mask3"]),
    ])
    pooled = []
    if "cls" in pooling_modes:
        _const(g, p + "zero", np.array(0, dtype=np.int64))
        nodes.append(helper.make_node("Gather", [p + "tokens", p + "zero"], [p + "cls"], axis=1))
        pooled.append(p + "cls")
    if "max" in pooling_modes:
        nodes.extend([
            helper.make_node("Cast", [p + "mask3"], [p + "mask_bool"], to=TensorProto.BOOL),
            helper.make_node("Where", [p + "mask_bool", p + "tokens", p + "neg_big"], [p + "masked_for_max"]),
            helper.make_node("ReduceMax", [p + "masked_for_max", p + "seq_axis"], [p + "max"], keepdims=0),
        ])
        pooled.append(p + "max")
    if "mean" in pooling_modes or "mean_sqrt_len_tokens" in pooling_modes:
        nodes.extend([
            helper.make_node("Mul", [p + "tokens", p + "mask3"], [p + "masked"]),
            helper.make_node("ReduceSum", [p + "masked", p + "seq_axis"], [p + "sum"], keepdims=0),
            helper.make_node("ReduceSum", [p + "mask3", p + "seq_axis"], [p + "count_raw"], keepdims=0),
            helper.make_node("Max", [p + "count_raw", p + "eps_count"], [p + "count"]),
        ])
        if "mean" in pooling_modes:
            nodes.append(helper.make_node("Div", [p + "sum", p + "count"], [p + "mean"]))
            pooled.append(p + "mean")
        if "mean_sqrt_len_tokens" in pooling_modes:
            nodes.extend([
                helper.make_node("Sqrt", [p + "count"], [p + "sqrt_count"]),
                helper.make_node("Div", [p + "sum", p + "sqrt_count"], [p + "mean_sqrt"]),
            ])
            pooled.append(p + "mean_sqrt")
    x = pooled[0]
    if len(pooled) > 1:
        nodes.append(helper.make_node("Concat", pooled, [p + "pooled"], axis=1))
        x = p + "pooled"
    for i, layer in enumerate(dense):
        w = _const(g, f"{p}dense{i}/weight_t", np.ascontiguousarray(layer.weight.T.astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{p}dense{i}/matmul"]))
        x = f"{p}dense{i}/matmul"
        if layer.bias is not None:
            b = _const(g, f"{p}dense{i}/bias", layer.bias.astype(np.float32))
            nodes.append(helper.make_node("Add", [x, b], [f"{p}dense{i}/add"]))
            x = f"{p}dense{i}/add"
        if layer.activation == "tanh":
            nodes.append(helper.make_node("Tanh", [x], [f"{p}dense{i}/tanh"]))
            x = f"{p}dense{i}/tanh"
        elif layer.activation != "identity":
            raise UserError(f"Dense activation {layer.activation!r} is not supported (identity, tanh)")
    # torch.nn.functional.normalize: x / max(||x||_2, eps)
    nodes.extend([
        helper.make_node("ReduceL2", [x, p + "last_axis"], [p + "norm_raw"], keepdims=1),
        helper.make_node("Max", [p + "norm_raw", p + "eps_norm"], [p + "norm"]),
        helper.make_node("Div", [x, p + "norm"], [EMBEDDER_OUTPUT]),
    ])
    g.output.append(helper.make_tensor_value_info(EMBEDDER_OUTPUT, TensorProto.FLOAT, ["batch_size", None]))
    model = prune(model, ["input_ids", "attention_mask"], [EMBEDDER_OUTPUT])
    onnx.checker.check_model(model, full_check=False)
    return model


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
    _replace(g.node, nodes)
    inits = [i for i in g.initializer if i.name in needed_values]
    _replace(g.initializer, inits)
    graph_inputs = [i for i in g.input if i.name in inputs]
    _replace(g.input, graph_inputs)
    vi = [v for v in g.value_info if v.name in needed_values]
    _replace(g.value_info, vi)
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
    _replace(g.initializer, keep)
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
    big = src.stat().st_size + sum(f.stat().st_size for f in set(side)) > EXTERNAL_DATA_THRESHOLD_BYTES
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
    _replace(g.node, nodes)
    _replace(g.initializer, [i for i in g.initializer if i.name in used] + added)
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
    _replace(g.node, new_nodes)
    # fp32 weights now unused by any node are dropped.
    used = {x for n in g.node for x in n.input}
    kept = [i for i in g.initializer if i.name in used]
    _replace(g.initializer, kept)
    del g.value_info[:]  # shapes/dtypes changed; ORT re-infers
    return out, converted


# --- decoder-only (causal) language models ---------------------------------------------------

CAUSAL_ASKLLM_VARIANTS_OUTPUT = "log_probs_yes_variants"
PERPLEXITY_OUTPUTS = ("nll_sum", "n_predicted")


def _causal_prelude(model: onnx.ModelProto, p: str) -> None:
    """Check optimum's text-generation graph and make `position_ids` inside it from the mask.

    Positions are `cumsum(mask) - 1` clipped at 0 (what transformers does without a cache),
    so right and left padding both give each real token its position in its own text.
    """
    g = model.graph
    _only(g.input, "input_ids", "causal LM")
    _only(g.input, "attention_mask", "causal LM")
    _only(g.output, "logits", "causal LM")
    if any(i.name.startswith("past_key_values") for i in g.input):
        raise UserError("the causal LM was exported with a KV cache; export the `text-generation` task without past")
    if any(i.name == "position_ids" for i in g.input):
        _replace(g.input, [i for i in g.input if i.name != "position_ids"])
        _const(g, p + "one_i64", np.array(1, dtype=np.int64))
        _const(g, p + "zero_i64", np.array(0, dtype=np.int64))
        g.node.insert(0, helper.make_node("Cast", ["attention_mask"], [p + "mask_i64"], to=TensorProto.INT64,
                                          name=p + "MaskI64"))
        g.node.insert(1, helper.make_node("CumSum", [p + "mask_i64", p + "one_i64"], [p + "cumsum"], name=p + "CumSum"))
        g.node.insert(2, helper.make_node("Sub", [p + "cumsum", p + "one_i64"], [p + "pos_raw"], name=p + "PosSub"))
        g.node.insert(3, helper.make_node("Max", [p + "pos_raw", p + "zero_i64"], ["position_ids"], name=p + "PosClip"))
    del g.output[:]


def _log_softmax_at(g: onnx.GraphProto, logits: str, p: str) -> str:
    """Nodes computing logsumexp over the last axis of fp32 `logits` (keepdims); returns its name.

    max + log(sum(exp(x - max))) spelled out: ORT's ReduceLogSumExp was measured 6e-4 off
    in log space on a 32k vocabulary.
    """
    _const(g, p + "vocab_axis", np.array([-1], dtype=np.int64))
    g.node.extend([
        helper.make_node("ReduceMax", [logits, p + "vocab_axis"], [p + "max"], keepdims=1, name=p + "Max"),
        helper.make_node("Sub", [logits, p + "max"], [p + "shifted"], name=p + "Shift"),
        helper.make_node("Exp", [p + "shifted"], [p + "exp"], name=p + "Exp"),
        helper.make_node("ReduceSum", [p + "exp", p + "vocab_axis"], [p + "sum"], keepdims=1, name=p + "Sum"),
        helper.make_node("Log", [p + "sum"], [p + "log_sum"], name=p + "Log"),
        helper.make_node("Add", [p + "max", p + "log_sum"], [p + "lse"], name=p + "LogSumExp"),
    ])
    return p + "lse"


def causal_askllm_graph(base: onnx.ModelProto, *, yes_token_id: int, no_token_id: int,
                        yes_variant_ids: Sequence[int], check: bool = True) -> onnx.ModelProto:
    """optimum's causal-LM graph → `(input_ids, attention_mask) -> log_probs [batch, 2],
    log_probs_yes_variants [batch, n_variants]`: full-vocabulary log-softmax at the last real
    token of each row (where the answer starts), evaluated only at the given ids.

    The LM head runs on that one position only: the hidden states are gathered before the
    head's MatMul, so the [batch, seq, vocab] logits are never computed.
    """
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    g.name = "askllm_causal"
    p = "askllm/"
    _causal_prelude(model, p)
    producer = next(n for n in g.node if "logits" in n.output)
    init_names = {i.name for i in g.initializer}
    if producer.op_type == "MatMul" and producer.input[1] in init_names:
        hidden, head_weight = producer.input[0], producer.input[1]
        _replace(g.node, [n for n in g.node if n is not producer])
    else:  # unknown head: gather the logits rows instead (correct, only slower)
        hidden, head_weight = "logits", None
    # Row b's answer position: (number of real tokens) - 1 for right padding; the last column
    # for left padding. `last = S - 1 - (argmax of the reversed mask)` covers both: it is
    # the index of the last 1 in the row.
    _const(g, p + "seq_axis", np.array([1], dtype=np.int64))
    _const(g, p + "minus_one", np.array([-1], dtype=np.int64))
    _const(g, p + "zero1", np.array([0], dtype=np.int64))
    _const(g, p + "one1", np.array([1], dtype=np.int64))
    _const(g, p + "two1", np.array([2], dtype=np.int64))
    _const(g, p + "three1", np.array([3], dtype=np.int64))
    _const(g, p + "zero_s", np.array(0, dtype=np.int64))
    _const(g, p + "one_s", np.array(1, dtype=np.int64))
    _const(g, p + "yes_no", np.array([yes_token_id, no_token_id], dtype=np.int64))
    _const(g, p + "variants", np.array(list(yes_variant_ids), dtype=np.int64))
    g.node.extend([
        helper.make_node("Cast", ["attention_mask"], [p + "mask64"], to=TensorProto.INT64, name=p + "Mask64"),
        helper.make_node("Shape", ["input_ids"], [p + "ids_shape"], name=p + "IdsShape"),
        helper.make_node("Gather", [p + "ids_shape", p + "zero_s"], [p + "batch"], axis=0, name=p + "Batch"),
        helper.make_node("Gather", [p + "ids_shape", p + "one_s"], [p + "seq"], axis=0, name=p + "Seq"),
        # positions j where mask is 1, weighted by j+1: the max of (j+1)*mask minus 1 is the last real index.
        helper.make_node("Range", [p + "zero_s", p + "seq", p + "one_s"], [p + "cols"], name=p + "Cols"),
        helper.make_node("Add", [p + "cols", p + "one_s"], [p + "cols1"], name=p + "Cols1"),
        helper.make_node("Mul", [p + "mask64", p + "cols1"], [p + "weighted"], name=p + "Weighted"),
        helper.make_node("ReduceMax", [p + "weighted", p + "seq_axis"], [p + "last1"], keepdims=0, name=p + "Last1"),
        helper.make_node("Sub", [p + "last1", p + "one_s"], [p + "last"], name=p + "Last"),
        helper.make_node("Range", [p + "zero_s", p + "batch", p + "one_s"], [p + "rows"], name=p + "Rows"),
        helper.make_node("Mul", [p + "rows", p + "seq"], [p + "row_start"], name=p + "RowStart"),
        helper.make_node("Add", [p + "row_start", p + "last"], [p + "flat_index"], name=p + "FlatIndex"),
        # hidden [B, S, D] -> [B*S, D] -> rows [B, D]
        helper.make_node("Shape", [hidden], [p + "hidden_shape"], name=p + "HiddenShape"),
        helper.make_node("Slice", [p + "hidden_shape", p + "two1", p + "three1"], [p + "hidden_dim"], name=p + "HiddenDim"),
        helper.make_node("Concat", [p + "minus_one", p + "hidden_dim"], [p + "flat_shape"], axis=0, name=p + "FlatShape"),
        helper.make_node("Reshape", [hidden, p + "flat_shape"], [p + "flat_hidden"], name=p + "Flatten"),
        helper.make_node("Gather", [p + "flat_hidden", p + "flat_index"], [p + "answer_hidden"], axis=0, name=p + "AnswerRow"),
    ])
    if head_weight is not None:
        g.node.append(helper.make_node("MatMul", [p + "answer_hidden", head_weight], [p + "answer_logits"],
                                       name=p + "lm_head/MatMul"))
    else:
        g.node.append(helper.make_node("Identity", [p + "answer_hidden"], [p + "answer_logits"], name=p + "AnswerLogits"))
    g.node.append(helper.make_node("Cast", [p + "answer_logits"], [p + "logits32"], to=TensorProto.FLOAT, name=p + "Cast"))
    lse = _log_softmax_at(g, p + "logits32", p)
    g.node.extend([
        helper.make_node("Gather", [p + "logits32", p + "yes_no"], [p + "yes_no_logits"], axis=1, name=p + "GatherYesNo"),
        helper.make_node("Sub", [p + "yes_no_logits", lse], [ASKLLM_OUTPUT], name=p + "YesNo"),
        helper.make_node("Gather", [p + "logits32", p + "variants"], [p + "variant_logits"], axis=1, name=p + "GatherVariants"),
        helper.make_node("Sub", [p + "variant_logits", lse], [CAUSAL_ASKLLM_VARIANTS_OUTPUT], name=p + "Variants"),
    ])
    g.output.append(helper.make_tensor_value_info(ASKLLM_OUTPUT, TensorProto.FLOAT, ["batch_size", 2]))
    g.output.append(helper.make_tensor_value_info(CAUSAL_ASKLLM_VARIANTS_OUTPUT, TensorProto.FLOAT,
                                                  ["batch_size", len(yes_variant_ids)]))
    model = prune(model, ["input_ids", "attention_mask"], [ASKLLM_OUTPUT, CAUSAL_ASKLLM_VARIANTS_OUTPUT])
    del g.value_info[:]  # shapes of the rewired head changed; ORT re-infers
    if check:
        onnx.checker.check_model(model, full_check=False)
    return model


def perplexity_graph(base: onnx.ModelProto, *, check: bool = True) -> onnx.ModelProto:
    """optimum's causal-LM graph → `(input_ids, attention_mask) -> nll_sum [batch], n_predicted [batch]`.

    nll_sum[b] = -Σ_t log P(x[b, t+1] | x[b, ≤t]) over the pairs where both tokens are real
    (mask 1), n_predicted[b] the number of such pairs: the mean per-token NLL (log
    perplexity) is their ratio. The per-position log-softmax stays inside the graph.
    """
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    g.name = "perplexity"
    p = "ppl/"
    _causal_prelude(model, p)
    _const(g, p + "zero1", np.array([0], dtype=np.int64))
    _const(g, p + "one1", np.array([1], dtype=np.int64))
    _const(g, p + "minus_one1", np.array([-1], dtype=np.int64))
    _const(g, p + "big", np.array([1 << 62], dtype=np.int64))
    _const(g, p + "seq_axis", np.array([1], dtype=np.int64))
    _const(g, p + "last_axis", np.array([-1], dtype=np.int64))
    g.node.append(helper.make_node("Cast", ["logits"], [p + "logits32"], to=TensorProto.FLOAT, name=p + "Cast"))
    lse = _log_softmax_at(g, p + "logits32", p)  # [B, S, 1]
    g.node.extend([
        # targets: the next token, shifted left; the last column gets token 0 and weight 0.
        helper.make_node("Slice", ["input_ids", p + "one1", p + "big", p + "seq_axis"], [p + "next_ids"], name=p + "NextIds"),
        helper.make_node("Slice", ["input_ids", p + "zero1", p + "one1", p + "seq_axis"], [p + "first_col"], name=p + "FirstCol"),
        helper.make_node("Mul", [p + "first_col", p + "zero1"], [p + "zero_col"], name=p + "ZeroCol"),
        helper.make_node("Concat", [p + "next_ids", p + "zero_col"], [p + "targets"], axis=1, name=p + "Targets"),
        helper.make_node("Unsqueeze", [p + "targets", p + "last_axis"], [p + "targets3"], name=p + "Targets3"),
        helper.make_node("GatherElements", [p + "logits32", p + "targets3"], [p + "target_logit"], axis=2,
                         name=p + "TargetLogit"),
        helper.make_node("Sub", [lse, p + "target_logit"], [p + "nll3"], name=p + "Nll"),
        helper.make_node("Squeeze", [p + "nll3", p + "last_axis"], [p + "nll"], name=p + "NllSqueeze"),
        # weight[t] = mask[t] * mask[t+1]
        helper.make_node("Cast", ["attention_mask"], [p + "mask_f"], to=TensorProto.FLOAT, name=p + "MaskF"),
        helper.make_node("Slice", [p + "mask_f", p + "one1", p + "big", p + "seq_axis"], [p + "next_mask"], name=p + "NextMask"),
        helper.make_node("Slice", [p + "mask_f", p + "zero1", p + "one1", p + "seq_axis"], [p + "mask_col"], name=p + "MaskCol"),
        helper.make_node("Mul", [p + "mask_col", p + "zero1_f"], [p + "zero_col_f"], name=p + "ZeroColF"),
        helper.make_node("Concat", [p + "next_mask", p + "zero_col_f"], [p + "next_mask_full"], axis=1, name=p + "NextMaskFull"),
        helper.make_node("Mul", [p + "mask_f", p + "next_mask_full"], [p + "weight"], name=p + "Weight"),
        helper.make_node("Mul", [p + "nll", p + "weight"], [p + "weighted_nll"], name=p + "WeightedNll"),
        helper.make_node("ReduceSum", [p + "weighted_nll", p + "seq_axis"], [PERPLEXITY_OUTPUTS[0]], keepdims=0, name=p + "NllSum"),
        helper.make_node("ReduceSum", [p + "weight", p + "seq_axis"], [PERPLEXITY_OUTPUTS[1]], keepdims=0, name=p + "Count"),
    ])
    _const(g, p + "zero1_f", np.array([0.0], dtype=np.float32))
    for name in PERPLEXITY_OUTPUTS:
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size"]))
    model = prune(model, ["input_ids", "attention_mask"], list(PERPLEXITY_OUTPUTS))
    if check:
        onnx.checker.check_model(model, full_check=False)
    return model
