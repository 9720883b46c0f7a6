"""What every ONNX text model here shares: a model folder, its tokenizer, one ORT session, a batched run.

A model is built from an opened folder (`OnnxTextModel.open(manifest, ...)`, or `load(model_dir)`
for one class, or `loader.load_model(model_dir)` to pick the class from the manifest). Each
subclass turns texts into token ids and reads the graph's outputs; `run_batched` does the rest:
length buckets, right padding, and the rows put back in input order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, ClassVar, Self, Sequence

import numpy as np

from streamfilter.errors import ConfigError, UserError
from streamfilter.models.manifest import Manifest, load_manifest
from streamfilter.models.text import length_buckets, pad_batch

DEFAULT_MAX_TOKENS = 512
# On CPU an inference batch holds about this many hidden values (padded tokens x the model's width,
# 4 MiB in fp32) unless the caller says otherwise: past that each token costs more, as the batch's
# activations leave the cache (bench/RESULTS.md, "Inference batches capped by tokens": flan-t5-small
# 2048 tokens, sentence-t5-base ~1024-1536 were fastest, both ~15% faster than batches of 32
# documents of any length). The batches that run at once share it: with two workers on two cores a
# batch of half as many tokens ran 7-12% faster, in about the memory of one full-size batch at a
# time (bench/RESULTS.md, "Inference workers"; more workers than two were not measured).
CPU_BATCH_VALUES = 2048 * 512
UNKNOWN_WIDTH = 1024  # a manifest that does not give the width (d_model or dim)


_POOLS: dict[int, ThreadPoolExecutor] = {}  # worker count -> the process's inference workers
_POOLS_LOCK = threading.Lock()
_CALLERS: ThreadPoolExecutor | None = None  # runs `run_side_by_side`'s calls


def inference_pool(workers: int) -> ThreadPoolExecutor:
    """The process's inference workers for models that run `workers` batches at once: one pool per
    worker count, shared by every such model, so that models called at the same time (the score
    stage's Ask-LLM scorer and embedder, see `run_side_by_side`) take turns on the same cores
    instead of running twice as many threads as there are cores."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix=f"sf-infer-{workers}w")
        return _POOLS[workers]


def run_side_by_side(calls: dict[str, Callable[[], Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Run model calls at once, each on a helper thread: each call's result and wall seconds, by name.
    Models that share `inference_pool` then keep every worker busy, one call's batches filling the
    gaps that another's longest batch leaves (bench/RESULTS.md, "Latency at a steady load"). If a
    call raises, this waits for the others, then raises the first error in the calls' order."""
    global _CALLERS
    with _POOLS_LOCK:
        if _CALLERS is None:
            _CALLERS = ThreadPoolExecutor(4, thread_name_prefix="sf-models")
    futures = {name: _CALLERS.submit(_timed, call) for name, call in calls.items()}
    wait(futures.values())
    timed = {name: future.result() for name, future in futures.items()}  # the first error, if any
    return {name: result for name, (result, _) in timed.items()}, {name: s for name, (_, s) in timed.items()}


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    return call(), time.perf_counter() - started


def cpu_batch_tokens(manifest: Manifest, workers: int = 1) -> int:
    """The default token limit of an inference batch on CPU: `CPU_BATCH_VALUES` over the model's width
    and the batches running at once, rounded down to a multiple of 256, at least 256 (one worker:
    flan-t5-small 2048, sentence-t5-base 1280; two: 1024 and 512)."""
    width = manifest.config.get("d_model") or manifest.config.get("dim") or UNKNOWN_WIDTH
    return max(256, CPU_BATCH_VALUES // int(width) // max(1, workers) // 256 * 256)


class OnnxTextModel:
    """An exported model folder on ONNX Runtime: `(input_ids, attention_mask) -> outputs` per batch.

    Subclasses name the manifest `KIND` they run and, where a kind has several graphs, the
    `BACKEND` (None: any). Constructor options past the opened parts (`max_tokens`, `dtype`, ...)
    are the subclass's, passed through `load`, `open` and `loader.load_model`; `batch_tokens` and
    `workers` are every model's (see `run_batched`).
    """

    KIND: ClassVar[str]
    BACKEND: ClassVar[str | None] = None

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, max_tokens: int):
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.variant = variant
        self.max_tokens = max_tokens
        self.pad_token_id: int = manifest.config["pad_token_id"]
        self.model_id = f"{manifest.name}@{manifest.variant_sha256(variant)[:12]}"
        # the most padded tokens in one inference batch (0: only batch_size limits a batch)
        self.batch_tokens: int = cpu_batch_tokens(manifest) if session.device == "cpu" else 0
        # inference batches run at once, each by one thread on the one session (`runtime.thread_layout`)
        self.workers: int = 1

    @classmethod
    def load(cls, model_dir: str | Path, *, variant: str | None = None, providers: Sequence[str] | None = None,
             intra_op_threads: int | None = None, batch_tokens: int | None = None, workers: int | None = None,
             **options: Any) -> Self:
        """Load a model folder of this class's kind (and backend), checking every file against its manifest.

        `variant`: "fp32", "int8" (CPU), "fp16" (GPU) where exported, or None for the best the
        device supports (`runtime.choose_variant`).
        """
        return cls.open(load_manifest(model_dir), variant=variant, providers=providers,
                        intra_op_threads=intra_op_threads, batch_tokens=batch_tokens, workers=workers, **options)

    @classmethod
    def open(cls, manifest: Manifest, *, variant: str | None = None, providers: Sequence[str] | None = None,
             intra_op_threads: int | None = None, batch_tokens: int | None = None, workers: int | None = None,
             **options: Any) -> Self:
        """The model of an already parsed manifest: checked (`check_manifest`), then its session opened.

        `batch_tokens`: the most padded tokens in one inference batch, 0 for no limit past the
        call's `batch_size`; None for the device's default (on CPU `cpu_batch_tokens` for the workers,
        on a GPU no limit).
        `workers` and `intra_op_threads`: how many inference batches run at once and how many
        threads each run uses; None (or 0) for `runtime.thread_layout`'s choice (on CPU one worker
        per core, each single-threaded; on a GPU one worker).
        """
        from streamfilter.models.runtime import open_model

        if batch_tokens is not None and batch_tokens < 0:
            raise ConfigError(f"batch_tokens: must be >= 0 (0: no limit), got {batch_tokens}")
        cls.check_manifest(manifest)
        session, tokenizer, variant, workers = open_model(manifest, variant, providers=providers,
                                                          intra_op_threads=intra_op_threads, workers=workers)
        model = cls(manifest, session, tokenizer, variant=variant, **options)
        model.workers = workers
        if batch_tokens is not None:
            model.batch_tokens = batch_tokens
        elif session.device == "cpu":
            model.batch_tokens = cpu_batch_tokens(manifest, workers)
        return model

    @classmethod
    def check_manifest(cls, manifest: Manifest) -> None:
        """UserError unless this class runs the folder's graph (before any file is read)."""
        if manifest.kind != cls.KIND:
            raise UserError(f"{manifest.root}: holds a {manifest.kind!r} model, not an {cls.KIND!r} model")
        if cls.BACKEND is not None and manifest.backend != cls.BACKEND:
            raise UserError(f"{manifest.root}: holds a {manifest.backend!r} {manifest.kind} model, which "
                            f"{cls.__name__} does not run; load it with streamfilter.models.load_model")

    @property
    def backend(self) -> str:
        """The manifest's backend: "seq2seq" (also every folder written before backends existed) or "causal"."""
        return self.manifest.backend

    @property
    def provider(self) -> str:
        return self.session.provider

    def run_batched(self, ids: Sequence[Sequence[int]], batch_size: int,
                    outputs: Sequence[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
        """The graph's outputs for the token id sequences `ids`, one array per graph output.

        `outputs` gives each output's shape past the batch axis and its dtype: output k is an
        array [len(ids), *shape_k], row i the graph's row for ids[i]. Batches are cut by length
        (`text.length_buckets`: at most `batch_size` documents and `self.batch_tokens` padded
        tokens) and right-padded with `pad_token_id`. The batches run on the process's shared
        `inference_pool`: with `self.workers` > 1 that many at once, the costliest first, and a call
        on fewer documents than `workers` x `batch_size` is cut into smaller batches so that every
        worker gets one. If a batch raises, the call waits for the batches running beside it, then
        raises the first error (in the order they started).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        out = [np.empty((len(ids), *shape), dtype=dtype) for shape, dtype in outputs]
        if not len(ids):
            return out
        lengths = [len(s) for s in ids]
        workers = min(self.workers, len(ids))
        batches = length_buckets(lengths, min(batch_size, -(-len(ids) // workers)), self.batch_tokens)
        # the costliest (padded tokens) first: the last to start are the cheapest, so the workers
        # finish close together (each batch is sorted by length: its last document is its longest).
        # Even a lone batch goes to the pool: another model's call may be using the workers.
        batches.sort(key=lambda batch: -len(batch) * lengths[batch[-1]])
        pool = inference_pool(self.workers)
        futures = [pool.submit(self._run_batch, ids, batch, out) for batch in batches]
        wait(futures)
        for future in futures:
            future.result()  # the first error, if any, once nothing runs any more
        return out

    def _run_batch(self, ids: Sequence[Sequence[int]], batch: list[int], out: list[np.ndarray]) -> None:
        """Run one inference batch (indices into `ids`) and write its rows of every output."""
        input_ids, mask = pad_batch([ids[i] for i in batch], self.pad_token_id)
        for array, rows in zip(out, self.session.run({"input_ids": input_ids, "attention_mask": mask}), strict=True):
            array[batch] = rows
