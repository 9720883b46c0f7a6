"""Graph heads on optimum's exports (export time only; needs `onnx`): each model folder's one graph.

- `askllm_graph`: optimum's T5 encoder and decoder graphs joined into one graph
  `(input_ids, attention_mask) -> log_probs [batch, 2]`: the decoder input is the
  decoder start token made inside the graph, and the graph ends in a full-vocabulary
  log-softmax evaluated only at the "yes" and "no" ids (log-sum-exp and a gather), so
  no [batch, vocab] logits ever leave the device.
- `embedder_graph`: a sentence-transformers module list (pooling, Dense, Normalize)
  appended to the exported transformer's token embeddings.
- `causal_askllm_graph`, `perplexity_graph`: a decoder-only LM's graph ending in the
  answer position's log-softmax at the yes/no ids, or in each document's NLL sum.

The variants of these graphs (int8, fp16) are made in `quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamfilter.errors import UserError
from streamfilter.models.graphs.edit import add_const, find_value, prune, replace_repeated

ASKLLM_OUTPUT = "log_probs"
EMBEDDER_OUTPUT = "sentence_embedding"
CAUSAL_ASKLLM_VARIANTS_OUTPUT = "log_probs_yes_variants"
PERPLEXITY_OUTPUTS = ("nll_sum", "n_predicted")


def _log_softmax_at(g: onnx.GraphProto, logits: str, p: str) -> str:
    """Nodes computing logsumexp over the last axis of fp32 `logits` (keepdims); returns its name.

    max + log(sum(exp(x - max))) spelled out: ORT's ReduceLogSumExp was measured 6e-4 off
    in log space on a 32k vocabulary, larger than the parity budget.
    """
    add_const(g, p + "vocab_axis", np.array([-1], dtype=np.int64))
    g.node.extend([
        helper.make_node("ReduceMax", [logits, p + "vocab_axis"], [p + "max"], keepdims=1, name=p + "Max"),
        helper.make_node("Sub", [logits, p + "max"], [p + "shifted"], name=p + "Shift"),
        helper.make_node("Exp", [p + "shifted"], [p + "exp"], name=p + "Exp"),
        helper.make_node("ReduceSum", [p + "exp", p + "vocab_axis"], [p + "sum"], keepdims=1, name=p + "Sum"),
        helper.make_node("Log", [p + "sum"], [p + "log_sum"], name=p + "Log"),
        helper.make_node("Add", [p + "max", p + "log_sum"], [p + "lse"], name=p + "LogSumExp"),
    ])
    return p + "lse"


def askllm_graph(encoder: onnx.ModelProto, decoder: onnx.ModelProto, *, decoder_start_token_id: int,
                 yes_token_id: int, no_token_id: int) -> onnx.ModelProto:
    """One graph: encoder, one decoder step from the start token, log-softmax at [yes, no]."""
    find_value(encoder.graph.input, "input_ids", "encoder")
    find_value(encoder.graph.input, "attention_mask", "encoder")
    find_value(encoder.graph.output, "last_hidden_state", "encoder")
    for name in ("input_ids", "encoder_hidden_states", "encoder_attention_mask"):
        find_value(decoder.graph.input, name, "decoder")
    find_value(decoder.graph.output, "logits", "decoder")
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
    add_const(g, "askllm/one", np.array([1], dtype=np.int64))
    add_const(g, "askllm/zero_to_one_start", np.array([0], dtype=np.int64))
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
    g.node.append(helper.make_node("Cast", ["decoder/logits"], ["askllm/logits32"], to=TensorProto.FLOAT,
                                   name="askllm/Cast"))
    lse = _log_softmax_at(g, "askllm/logits32", "askllm/")
    add_const(g, "askllm/yes_no", np.array([yes_token_id, no_token_id], dtype=np.int64))
    add_const(g, "askllm/step_axis", np.array([1], dtype=np.int64))
    g.node.extend([
        helper.make_node("Gather", ["askllm/logits32", "askllm/yes_no"], ["askllm/yes_no_logits"], axis=2,
                         name="askllm/GatherYesNo"),
        helper.make_node("Sub", ["askllm/yes_no_logits", lse], ["askllm/log_probs3"], name="askllm/Sub"),
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
    find_value(transformer.graph.output, token_output, "transformer")
    for mode in pooling_modes:
        if mode not in POOLING_MODES:
            raise UserError(f"pooling mode {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    model = onnx.ModelProto()
    model.CopyFrom(transformer)
    g = model.graph
    del g.output[:]
    nodes = g.node
    p = "head/"
    add_const(g, p + "seq_axis", np.array([1], dtype=np.int64))
    add_const(g, p + "last_axis", np.array([-1], dtype=np.int64))
    add_const(g, p + "eps_count", np.array(1e-9, dtype=np.float32))
    add_const(g, p + "eps_norm", np.array(1e-12, dtype=np.float32))
    add_const(g, p + "neg_big", np.array(-1e9, dtype=np.float32))
    nodes.extend([
        helper.make_node("Cast", [token_output], [p + "tokens"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], [p + "mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "mask_f", p + "last_axis"], [p + "mask3"]),
    ])
    pooled = []
    if "cls" in pooling_modes:
        add_const(g, p + "zero", np.array(0, dtype=np.int64))
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
        w = add_const(g, f"{p}dense{i}/weight_t", np.ascontiguousarray(layer.weight.T.astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{p}dense{i}/matmul"]))
        x = f"{p}dense{i}/matmul"
        if layer.bias is not None:
            b = add_const(g, f"{p}dense{i}/bias", layer.bias.astype(np.float32))
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


# --- decoder-only (causal) language models ---------------------------------------------------

def _causal_copy(base: onnx.ModelProto, name: str, p: str) -> onnx.ModelProto:
    """A copy of optimum's text-generation graph, checked, named `name`, with no outputs yet and
    `position_ids` made inside it from the mask (node and value names prefixed with `p`).

    Positions are `cumsum(mask) - 1` clipped at 0 (what transformers does without a cache),
    so right and left padding both give each real token its position in its own text.
    """
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    g.name = name
    find_value(g.input, "input_ids", "causal LM")
    find_value(g.input, "attention_mask", "causal LM")
    find_value(g.output, "logits", "causal LM")
    if any(i.name.startswith("past_key_values") for i in g.input):
        raise UserError("the causal LM was exported with a KV cache; export the `text-generation` task without past")
    if any(i.name == "position_ids" for i in g.input):
        replace_repeated(g.input, [i for i in g.input if i.name != "position_ids"])
        add_const(g, p + "one_i64", np.array(1, dtype=np.int64))
        add_const(g, p + "zero_i64", np.array(0, dtype=np.int64))
        g.node.insert(0, helper.make_node("Cast", ["attention_mask"], [p + "mask_i64"], to=TensorProto.INT64,
                                          name=p + "MaskI64"))
        g.node.insert(1, helper.make_node("CumSum", [p + "mask_i64", p + "one_i64"], [p + "cumsum"], name=p + "CumSum"))
        g.node.insert(2, helper.make_node("Sub", [p + "cumsum", p + "one_i64"], [p + "pos_raw"], name=p + "PosSub"))
        g.node.insert(3, helper.make_node("Max", [p + "pos_raw", p + "zero_i64"], ["position_ids"], name=p + "PosClip"))
    del g.output[:]
    return model


def causal_askllm_graph(base: onnx.ModelProto, *, yes_token_id: int, no_token_id: int,
                        yes_variant_ids: Sequence[int], check: bool = True) -> onnx.ModelProto:
    """optimum's causal-LM graph → `(input_ids, attention_mask) -> log_probs [batch, 2],
    log_probs_yes_variants [batch, n_variants]`: full-vocabulary log-softmax at the last real
    token of each row (where the answer starts), evaluated only at the given ids.

    The LM head runs on that one position only: the hidden states are gathered before the
    head's MatMul, so the [batch, seq, vocab] logits are never computed.
    """
    p = "askllm/"
    model = _causal_copy(base, "askllm_causal", p)
    g = model.graph
    producer = next(n for n in g.node if "logits" in n.output)
    init_names = {i.name for i in g.initializer}
    if producer.op_type == "MatMul" and producer.input[1] in init_names:
        hidden, head_weight = producer.input[0], producer.input[1]
        replace_repeated(g.node, [n for n in g.node if n is not producer])
    else:  # unknown head: gather the logits rows instead (correct, only slower)
        hidden, head_weight = "logits", None
    # Row b's answer position: (number of real tokens) - 1 for right padding; the last column
    # for left padding. `last = S - 1 - (argmax of the reversed mask)` covers both: it is
    # the index of the last 1 in the row.
    add_const(g, p + "seq_axis", np.array([1], dtype=np.int64))
    add_const(g, p + "minus_one", np.array([-1], dtype=np.int64))
    add_const(g, p + "zero1", np.array([0], dtype=np.int64))
    add_const(g, p + "one1", np.array([1], dtype=np.int64))
    add_const(g, p + "two1", np.array([2], dtype=np.int64))
    add_const(g, p + "three1", np.array([3], dtype=np.int64))
    add_const(g, p + "zero_s", np.array(0, dtype=np.int64))
    add_const(g, p + "one_s", np.array(1, dtype=np.int64))
    add_const(g, p + "yes_no", np.array([yes_token_id, no_token_id], dtype=np.int64))
    add_const(g, p + "variants", np.array(list(yes_variant_ids), dtype=np.int64))
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
    p = "ppl/"
    model = _causal_copy(base, "perplexity", p)
    g = model.graph
    add_const(g, p + "zero1", np.array([0], dtype=np.int64))
    add_const(g, p + "one1", np.array([1], dtype=np.int64))
    add_const(g, p + "minus_one1", np.array([-1], dtype=np.int64))
    add_const(g, p + "big", np.array([1 << 62], dtype=np.int64))
    add_const(g, p + "seq_axis", np.array([1], dtype=np.int64))
    add_const(g, p + "last_axis", np.array([-1], dtype=np.int64))
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
    add_const(g, p + "zero1_f", np.array([0.0], dtype=np.float32))
    for name in PERPLEXITY_OUTPUTS:
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size"]))
    model = prune(model, ["input_ids", "attention_mask"], list(PERPLEXITY_OUTPUTS))
    if check:
        onnx.checker.check_model(model, full_check=False)
    return model
