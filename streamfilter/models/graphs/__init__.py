"""ONNX graph surgery on optimum's exports (export time only; needs `onnx`).

- `heads`: the one graph of each model folder (Ask-LLM seq2seq and causal, embedder, perplexity).
- `quantize`: its variants (int8 for CPU, fp16/bf16 matmuls for GPU).
- `edit`: protobuf editing both use (pruning, shared initializers, saving past 2 GB).
"""
