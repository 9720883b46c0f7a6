"""ONNX Runtime sessions: providers (CUDA/TensorRT, then CPU), threads, graph optimisation, IO binding.

The provider actually used is logged once per session ("askllm flan-t5-small@… runs on
CUDAExecutionProvider"), because ONNX Runtime silently falls back to CPU when the CUDA
libraries are missing. On a GPU, inputs are copied to the device once and only the
graph's (small) outputs come back to the host, through IO binding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from streamfilter.errors import ConfigError
from streamfilter.models.manifest import Manifest

log = logging.getLogger(__name__)

# Preference order when the caller does not name providers. TensorRT is opt-in
# (providers=["tensorrt", ...]): it builds an engine per input-shape profile, minutes
# for T5, which a daemon starting up should not do by surprise.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = {"TensorrtExecutionProvider": "cuda", "CUDAExecutionProvider": "cuda"}
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """The providers to ask ONNX Runtime for, in order; always ending with CPU.

    `requested` may use short names ("cuda", "tensorrt", "cpu"). Requested providers
    that this onnxruntime build lacks are an error (the user asked for them); with
    `requested=None` the available ones of `DEFAULT_PROVIDERS` are used.
    """
    available = ort.get_available_providers()
    if requested is None:
        chosen = [p for p in DEFAULT_PROVIDERS if p in available]
    else:
        chosen = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise ConfigError(
                f"providers: {', '.join(missing)} not available in this onnxruntime build "
                f"(available: {', '.join(available)}); install the `gpu` extra for CUDA"
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def gpu_available() -> bool:
    return any(p in ort.get_available_providers() for p in GPU_PROVIDERS)


@dataclass
class Session:
    """An InferenceSession with its device, running through IO binding."""

    session: ort.InferenceSession
    provider: str  # the first provider the session actually got
    device: str  # "cpu" or "cuda"
    label: str

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run with IO binding: inputs copied to the session's device, outputs fetched to the host."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            if self.device == "cpu":
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0))
        for name in self.output_names:
            # Outputs here are small ([batch, 2] or [batch, dim]): let ORT allocate them on the host.
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def make_session(
    model: bytes | str | Path,
    *,
    label: str,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    graph_optimization: str = "all",
    workers: int = 1,
) -> Session:
    """Create a session for `model` (bytes of a self-contained ONNX file, or a path).

    `intra_op_threads=None` uses one thread per available core. `graph_optimization` is
    one of "disable", "basic", "extended", "all". `workers`: how many runs the caller makes at once.
    """
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_optimization not in levels:
        raise ConfigError(f"graph_optimization: {graph_optimization!r} is not one of {', '.join(levels)}")
    if intra_op_threads is not None and intra_op_threads < 0:
        raise ConfigError(f"intra_op_threads: must be >= 0 (0 = ONNX Runtime's default), got {intra_op_threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    options.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else _default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads sleep instead of spinning. Spinning burns a core whenever anything else
    # wants it (the daemon's Kafka clients, sketch and route, the broker, neighbours). On 2 shared
    # cores `run` spent ~4% less CPU per document with this and the one-thread BLAS together, and
    # the bare scorers lost nothing without spinning (bench/RESULTS.md, "Throughput and latency").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if workers > 1:
        # A memory pattern plans one block for all of a run's activations per input shape; runs side
        # by side each hold theirs. Without it, freed activations are reused within each run: two
        # workers' peak RSS fell from ~990 to ~860 MiB (one worker's: 883) at the same speed.
        options.enable_mem_pattern = False
    options.log_severity_level = 3  # ORT's own warnings (e.g. "some nodes were not assigned to CUDA") are noise here
    chosen = resolve_providers(providers)
    provider_options = [_provider_options(p) for p in chosen]
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                   providers=chosen, provider_options=provider_options)
    used = session.get_providers()[0]
    device = GPU_PROVIDERS.get(used, "cpu")
    if providers is None or used == PROVIDER_ALIASES.get(str(providers[0]).lower(), providers[0]):
        log.info("%s runs on %s (%d intra-op threads)", label, used, options.intra_op_num_threads)
    else:
        log.warning("%s runs on %s: %s was requested but did not start (CUDA/cuDNN libraries missing?)",
                    label, used, providers[0])
    return Session(session=session, provider=used, device=device, label=label)


def thread_layout(workers: int | None, intra_op_threads: int | None, on_gpu: bool) -> tuple[int, int | None]:
    """(inference workers, intra-op threads per session run) for a model; None or 0 is "choose".

    A worker is a thread that runs one inference batch at a time on the model's one session, so
    `workers` batches run at once. On CPU the default is one worker per core, each run single-
    threaded: ONNX Runtime's intra-op pool splits every operator across its threads and waits for
    all of them, so a thread of the daemon or the broker that takes a core from one of them holds
    up the whole operator, while one-thread runs side by side lose only the time taken from them
    (bench/RESULTS.md, "Inference workers"). Given one of the two, the other divides the cores by
    it. On a GPU one worker feeds the device (`intra_op_threads` None: ONNX Runtime's default).
    """
    if workers is not None and workers < 0:
        raise ConfigError(f"inference_workers: must be >= 0 (0: one per core on CPU, 1 on a GPU), got {workers}")
    if intra_op_threads is not None and intra_op_threads < 0:
        raise ConfigError(f"intra_op_threads: must be >= 0 (0: chosen with the workers), got {intra_op_threads}")
    workers, intra_op_threads = workers or None, intra_op_threads or None
    if on_gpu:
        return workers or 1, intra_op_threads
    cores = _default_threads()
    if workers is None:
        workers = max(1, cores // (intra_op_threads or 1))
    if intra_op_threads is None:
        intra_op_threads = max(1, cores // workers)
    return workers, intra_op_threads


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _provider_options(provider: str) -> dict[str, str]:
    if provider == "TensorrtExecutionProvider":
        # Engines are expensive to build: cache them next to nothing user-visible by default.
        return {"trt_fp16_enable": "False", "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(Path.home() / ".cache" / "streamfilter" / "trt")}
    if provider == "CUDAExecutionProvider":
        return {"cudnn_conv_algo_search": "HEURISTIC"}
    return {}


def choose_variant(manifest: Manifest, variant: str | None, on_gpu: bool) -> str:
    if variant is None:
        # GPU: fp32 until the fp16 variant is validated on the GPU in use (bench/gpu measures
        # it against fp32); CPU: int8 (several times faster, rank-equivalent in our measurements)
        # unless its exporter marked it `"auto": false` (a measured loss to opt into: decoder-only
        # Ask-LLM, whose int8 cost 0.047 ROC AUC on Qwen2.5-1.5B, bench/RESULTS.md).
        preference = ("fp32",) if on_gpu else ("int8", "fp32")
        candidates = [v for v, spec in manifest.variants.items() if spec.get("auto", True)]
        variant = next((v for v in preference if v in candidates), None)
        if variant is None:
            variant = next(iter(manifest.variants))
    if variant not in manifest.variants:
        raise ConfigError(f"variant: {manifest.root} has no {variant!r} variant (has {', '.join(manifest.variants)})")
    return variant


def open_variant(manifest: Manifest, variant: str, *, providers, intra_op_threads, workers: int = 1):
    """An ONNX Runtime session for one variant of the model folder, its files checked against the manifest."""
    spec = manifest.variants[variant]
    label = f"{manifest.kind} {manifest.name}@{manifest.variant_sha256(variant)[:12]} ({variant})"
    if spec.get("external_data"):
        # Weights > 2 GB live beside the graph: hash every file, then load by path.
        for name in [spec["model"], *spec["external_data"]]:
            manifest.verify_file(name)
        model = manifest.path(spec["model"])
    else:
        model = manifest.read_verified(spec["model"])  # the bytes hashed are the bytes loaded
    return make_session(model, label=label, providers=providers, intra_op_threads=intra_op_threads, workers=workers)


def open_model(manifest: Manifest, variant: str | None, *, providers, intra_op_threads, workers=None):
    """(session, tokenizer, variant, workers) for a model folder: the variant chosen for the device
    (`choose_variant`), the tokenizer and the graph both checked against the manifest, the session's
    threads and the number of inference workers from `thread_layout`."""
    from streamfilter.models.text import load_tokenizer

    on_gpu = gpu_available() and resolve_providers(providers)[0] != "CPUExecutionProvider"
    variant = choose_variant(manifest, variant, on_gpu)
    workers, intra_op_threads = thread_layout(workers, intra_op_threads, on_gpu)
    tokenizer = load_tokenizer(str(manifest.path(manifest.tokenizer)))
    manifest.verify_file(manifest.tokenizer)
    session = open_variant(manifest, variant, providers=providers, intra_op_threads=intra_op_threads, workers=workers)
    return session, tokenizer, variant, workers
