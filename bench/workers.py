"""Inference workers: one ONNX Runtime run on every core, or single-threaded runs side by side.

The bare scorers (flan-t5-small + sentence-t5-base architectures, random weights, int8, the web
mix, 128 documents per call as the score stage's micro-batch), each measurement in a fresh process
(so its peak RSS is its own), in these layouts (`models.inference_workers` x `intra_op_threads`):

- "1 x all cores": one run at a time on an intra-op pool of every core (the layout before workers);
- "workers x 1, full-size batches": one single-threaded run per core, each batch of one worker's
  token limit (`cpu_batch_tokens(manifest, 1)`);
- "workers x 1" (the default): the same, the token limit shared by the batches running at once;
- "workers x all cores": runs side by side, each with an intra-op pool of every core (the pool's
  threads help whichever run has work, so a lone small batch still gets every core).

Each alone, and beside a competing process that takes `--share` of one core in 1 ms bursts (the
kind of work the daemon's Kafka clients, sketch and route and the broker do beside inference; see
bench/interference.py). Then the time of one call on a few documents (the score stage's batches at
low load), median of `--calls` calls on random documents, per layout.

    .venv/bin/python bench/workers.py [--docs 400] [--rounds 2] [--share 0.15] [--calls 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from interference import BURN  # noqa: E402
from models_cpu import build, document_sets  # noqa: E402

CORES = len(os.sched_getaffinity(0))
LAYOUTS = {  # name -> (workers, intra-op threads, full-size batches)
    f"1 x {CORES} (one run on every core)": (1, CORES, False),
    f"{CORES} x 1, full-size batches": (CORES, 1, True),
    f"{CORES} x 1 (default)": (CORES, 1, False),
    f"{CORES} x {CORES}": (CORES, CORES, False),
}


def load(layout: str):
    from streamfilter.models import AskLLMScorer, SentenceEmbedder
    from streamfilter.models.base import cpu_batch_tokens

    root = REPO / ".cache" / "bench-models"
    workers, threads, full = LAYOUTS[layout]
    models = [AskLLMScorer.load(build("flan-t5-small", root)[1], variant="int8", workers=workers, intra_op_threads=threads),
              SentenceEmbedder.load(build("sentence-t5-base", root)[1], variant="int8", dtype="float16",
                                    workers=workers, intra_op_threads=threads)]
    if full:
        for m in models:
            m.batch_tokens = cpu_batch_tokens(m.manifest, 1)
    return models


def call(models, texts: list[str]) -> None:
    scorer, embedder = models
    scorer.score(texts, batch_size=32)
    embedder.embed(texts, batch_size=32)


def child(layout: str, docs: int) -> dict:
    """One measurement, in this (fresh) process: docs/s, CPU s/doc, peak RSS."""
    models = load(layout)
    texts = document_sets(0, docs)["web mix"]
    call(models, texts[:32])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), 128):
        call(models, texts[i:i + 128])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM"))
    return {"docs_per_s": len(texts) / wall, "cpu_s_per_doc": cpu / len(texts), "peak_mib": hwm // 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--share", type=float, default=0.15, help="the competitor's share of one core")
    parser.add_argument("--calls", type=int, default=15, help="small calls timed per size and layout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.docs)))
        return
    print(f"{CORES} cores; {args.docs} documents in calls of 128, each measurement in a fresh process\n")
    print("| round | layout | competitor | docs/s | CPU s/doc | peak RSS |\n|---|---|---|---|---|---|")
    results: dict[tuple[str, bool], list[float]] = {}
    for r in range(1, args.rounds + 1):
        for competing in (False, True):
            for layout in LAYOUTS:
                competitor = None
                if competing:
                    burst = 0.001
                    competitor = subprocess.Popen([sys.executable, "-c", BURN, str(burst),
                                                   str(burst * (1 - args.share) / args.share)])
                try:
                    out = subprocess.run([sys.executable, __file__, "--child", layout, "--docs", str(args.docs)],
                                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
                m = json.loads(out)
                results.setdefault((layout, competing), []).append(m["docs_per_s"])
                label = f"{args.share:.0%} of a core in 1 ms bursts" if competing else "none"
                print(f"| {r} | {layout} | {label} | {m['docs_per_s']:.2f} | {m['cpu_s_per_doc']:.4f} | "
                      f"{m['peak_mib']} MiB |", flush=True)
    print("\nmean docs/s:")
    for (layout, competing), rates in results.items():
        print(f"  {layout}, {'with' if competing else 'without'} the competitor: {np.mean(rates):.2f}")

    print("\none call on a few documents (the score stage at low load), median ms of "
          f"{args.calls} calls on random documents:\n")
    models = {layout: load(layout) for layout in LAYOUTS}
    texts = document_sets(0, args.docs)["web mix"]
    for m in models.values():
        call(m, texts[:32])
    rng = np.random.default_rng(0)
    sizes = (1, 2, 3, 4, 8, 16, 32)
    print("| documents | " + " | ".join(models) + " |\n|---|" + "---|" * len(models))
    for n in sizes:
        times: dict[str, list[float]] = {layout: [] for layout in models}
        for _ in range(args.calls):
            part = [texts[i] for i in rng.choice(len(texts), n, replace=False)]
            for layout, m in models.items():  # the same documents for every layout, interleaved
                t0 = time.perf_counter()
                call(m, part)
                times[layout].append(time.perf_counter() - t0)
        print(f"| {n} | " + " | ".join(f"{np.median(t) * 1000:.0f}" for t in times.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
