"""One Qwen2.5-1.5B feed-forward matmul ([4 x 350, 1536] x [1536, 8960]) on ONNX Runtime's CPU
kernels: fp32 MatMul, the dynamic int8 op our int8 variants use (DynamicQuantizeMatMul: weights
int8 per column, activations uint8 per tensor), and weight-only 8-bit MatMulNBits (blocks of 32
or 128 along K; accuracy_level 0 = fp32 compute, 4 = int8 compute with activations per block).

    python bench/int8_matmul.py [--threads 1] [--seconds 3]

Prints ms per run (best of a few timed loops, one process, so the ratios are fair on a noisy
machine) and the max error relative to the largest fp32 output. Random weights (0.02 std)
and activations; with outlier features in the activations the per-tensor op loses more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamfilter.models.graphs.quantize import _int8_blocks, _int8_per_column  # noqa: E402


def _model(node, initializers, k: int) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def candidates(w: np.ndarray) -> dict[str, bytes]:
    from onnx import helper, numpy_helper

    k, n = w.shape
    out = {"fp32 MatMul": _model(helper.make_node("MatMul", ["A", "W"], ["Y"]), [numpy_helper.from_array(w, "W")], k)}
    q, scale = _int8_per_column(w)
    out["DynamicQuantizeMatMul"] = _model(
        helper.make_node("DynamicQuantizeMatMul", ["A", "Q", "S", "Z"], ["Y"], domain="com.microsoft"),
        [numpy_helper.from_array(q, "Q"), numpy_helper.from_array(scale, "S"),
         numpy_helper.from_array(np.zeros_like(q[0]), "Z")], k)
    for block in (32, 128):
        packed, scales = _int8_blocks(w, block)
        for level in (0, 4):
            attrs = dict(K=k, N=n, bits=8, block_size=block, **({"accuracy_level": level} if level else {}))
            out[f"MatMulNBits b{block} acc{level}"] = _model(
                helper.make_node("MatMulNBits", ["A", "P", "S"], ["Y"], domain="com.microsoft", **attrs),
                [numpy_helper.from_array(packed, "P"), numpy_helper.from_array(scales, "S")], k)
    return out


def main() -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0, help="per timed loop (three loops, best kept)")
    args = ap.parse_args()
    k, n, batch, tokens = 1536, 8960, 4, 350
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    a = rng.standard_normal((batch, tokens, k)).astype(np.float32)
    reference = a @ w
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    print(f"[{batch} x {tokens}, {k}] x [{k}, {n}], {args.threads} thread(s)")
    fp32_ms = None
    for name, model in candidates(w).items():
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        y = session.run(None, {"A": a})[0]
        best = float("inf")
        for _ in range(3):
            t0, runs = time.perf_counter(), 0
            while time.perf_counter() - t0 < args.seconds:
                session.run(None, {"A": a})
                runs += 1
            best = min(best, (time.perf_counter() - t0) / runs * 1000)
        fp32_ms = fp32_ms or best
        error = np.abs(y - reference).max() / np.abs(reference).max()
        print(f"{name:26s} {best:8.1f} ms  {fp32_ms / best:5.2f}x fp32  max rel error {error:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
