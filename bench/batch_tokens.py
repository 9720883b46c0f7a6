"""Inference batches capped by padded tokens: seconds per model at each `batch_tokens`, one run.

Full-size architectures with random weights (bench/models_cpu.py: flan-t5-small for Ask-LLM,
sentence-t5-base for the embedder), the web mix of bench/daemon_e2e.py, int8, inference batch 32.
Each model is timed over all the documents in one call and in calls of `--chunk` documents
(a score micro-batch), at each token limit in turn; `--rounds` repeats the whole sweep, so a
drift of the machine shows as a difference between rounds rather than between settings.
`0` is no limit (only the 32 documents cut a batch), `default` the model's CPU default
(`models.base.cpu_batch_tokens`). `--shapes` first times one session run per batch shape
(documents x tokens, best of 3), the cost per token that the limit follows.

    .venv/bin/python bench/batch_tokens.py [--docs 800] [--chunk 128] [--rounds 1] [--shapes]
        [--askllm-tokens 0,default,1024,4096] [--embedder-tokens 0,default,768,2048]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from models_cpu import build, document_sets  # noqa: E402


def timed(fn, texts: list[str], chunk: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `fn` over `texts`, called on `chunk` documents at a time."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), chunk):
        fn(texts[i:i + chunk])
    return time.perf_counter() - t0, time.process_time() - c0


def shapes(models: dict) -> None:
    """Microseconds per token of one session run, by documents per batch and tokens per document."""
    sizes = (1, 4, 8, 16, 32)
    for name, (model, _, _) in models.items():
        lengths = [n for n in (32, 128, 256, 512) if n <= model.max_tokens]
        print(f"\n{name}: microseconds per token of one run (best of 3), documents x tokens\n")
        print("| documents | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
        print("|---|" + "---|" * len(lengths))
        for b in sizes:
            cells = []
            for n in lengths:
                feeds = {"input_ids": np.full((b, n), 5, dtype=np.int64), "attention_mask": np.ones((b, n), dtype=np.int64)}
                model.session.run(feeds)
                best = min(timed(lambda _: model.session.run(feeds), [None], 1)[0] for _ in range(3))
                cells.append(f"{best * 1e6 / (b * n):.0f}")
            print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=800)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--askllm-tokens", default="0,default,1024,4096")
    parser.add_argument("--embedder-tokens", default="0,default,768,2048")
    parser.add_argument("--shapes", action="store_true", help="first time one run per batch shape")
    args = parser.parse_args()

    from streamfilter.models import AskLLMScorer, SentenceEmbedder
    from streamfilter.models.base import cpu_batch_tokens

    root = REPO / ".cache" / "bench-models"
    _, askllm = build("flan-t5-small", root)
    _, embedder = build("sentence-t5-base", root)
    texts = document_sets(0, args.docs)["web mix"]
    scorer = AskLLMScorer.load(askllm, variant="int8", intra_op_threads=args.threads)
    emb = SentenceEmbedder.load(embedder, variant="int8", dtype="float16", intra_op_threads=args.threads)
    models = {"askllm": (scorer, lambda part: scorer.score(part, batch_size=args.batch), args.askllm_tokens),
              "embedder": (emb, lambda part: emb.embed(part, batch_size=args.batch), args.embedder_tokens)}
    if args.shapes:
        shapes(models)
    for model, fn, _ in models.values():
        model.batch_tokens = 0
        fn(texts[:args.batch])  # warm-up
    rows = []
    for rnd in range(args.rounds):
        for name, (model, fn, settings) in models.items():
            for setting in settings.split(","):
                tokens = cpu_batch_tokens(model.manifest, model.workers) if setting == "default" else int(setting)
                model.batch_tokens = tokens
                for chunk in (len(texts), args.chunk):
                    wall, cpu = timed(fn, texts, chunk)
                    rows.append((rnd, name, setting, tokens, chunk, wall, cpu))
                    print(f"round {rnd} {name} batch_tokens {tokens} ({setting}) calls of {chunk}: "
                          f"{wall:.2f} s, {cpu:.1f} CPU-s", flush=True)
    print(f"\n{args.docs} documents, int8, {args.threads} threads, inference batch {args.batch}\n")
    print("| round | model | batch_tokens | s, one call | s, calls of %d | vs no limit (one call, calls of %d) |"
          % (args.chunk, args.chunk))
    print("|---|---|---|---|---|---|")
    for rnd in range(args.rounds):
        for name in models:
            mine = [r for r in rows if r[0] == rnd and r[1] == name]
            base = {r[4]: r[5] for r in mine if r[3] == 0}
            for setting in dict.fromkeys(r[2] for r in mine):
                cells = {r[4]: r for r in mine if r[2] == setting}
                whole, part = cells[len(texts)], cells[args.chunk]
                label = f"{whole[3]}" + (" (default)" if setting == "default" else " (no limit)" if whole[3] == 0 else "")
                ratio = (f"{whole[5] / base[len(texts)]:.2f}, {part[5] / base[args.chunk]:.2f}"
                         if base else "")
                print(f"| {rnd} | {name} | {label} | {whole[5]:.2f} | {part[5]:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
