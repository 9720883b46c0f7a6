"""CPU benchmark: Ask-LLM and Sentence-T5 on ONNX Runtime (fp32, int8) vs PyTorch eager, side by side.

Full-size architectures with random weights (speed does not depend on weight values):
flan-t5-small and flan-t5-base for Ask-LLM, sentence-t5-base for the embedder, built
from config dicts below (no hub) and exported through streamfilter's export code into
.cache/bench-models/. Two document sets: every prompt at the full 512 tokens, and a
web-like mix (real Wikipedia summaries, junk, a few long pages truncated at 512).

    python bench/models_cpu.py [--models flan-t5-small,flan-t5-base,sentence-t5-base] [--threads 2]

The PyTorch baseline is what a user would write: tokenizer(prompts, padding, truncation)
and one forward with one decoder step (Ask-LLM), or SentenceTransformer.encode
(embedder), with the same batch size and the same length-sorted batches.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamfilter.corpus import junk_documents, wiki_documents  # noqa: E402

T5_COMMON = dict(vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=32)
CONFIGS = {
    "flan-t5-small": dict(T5_COMMON, d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "flan-t5-base": dict(T5_COMMON, d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "sentence-t5-base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                             feed_forward_proj="relu", pad_token_id=0, eos_token_id=1),
}
DOCS = {"flan-t5-small": (12, 32), "flan-t5-base": (6, 16), "sentence-t5-base": (12, 32)}  # (at 512, mix)


def build(name: str, root: Path) -> tuple[Path, Path]:
    """(HF source folder, exported streamfilter folder) for a full-size random model."""
    src, out = root / "sources" / name, root / name
    if (out / "manifest.json").is_file():
        return src, out
    import torch
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    from streamfilter.models.export import export_askllm, export_embedder
    from streamfilter.models.testmodels import _t5_tokenizer

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    if name.startswith("flan"):
        T5ForConditionalGeneration(T5Config(**CONFIGS[name])).save_pretrained(src)
        tok.save_pretrained(src)
        export_askllm(str(src), out, name=name, variants=("fp32", "int8"))
    else:
        from sentence_transformers import SentenceTransformer, models

        hf = root / "sources" / (name + "-hf")
        T5EncoderModel(T5Config(**CONFIGS[name])).save_pretrained(hf)
        tok.save_pretrained(hf)
        d = CONFIGS[name]["d_model"]
        SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=256), models.Pooling(d, "mean"),
                                     models.Dense(d, d, bias=False, activation_function=torch.nn.Identity()),
                                     models.Normalize()], device="cpu").save(str(src))
        export_embedder(str(src), out, name=name)
    return src, out


def document_sets(n_full: int, n_mix: int) -> dict[str, list[str]]:
    rng = random.Random(0)
    wiki = [d.text for d in wiki_documents()]
    long_page = lambda: " ".join(rng.sample(wiki, 12))  # noqa: E731  (> 512 tokens)
    mix = []
    for _ in range(n_mix):
        r = rng.random()
        mix.append(rng.choice(wiki) if r < 0.6 else junk_documents(1, seed=rng.randrange(10**6))[0].text if r < 0.85
                   else long_page())
    return {"512 tokens": [long_page() for _ in range(n_full)], "web mix": mix}


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_askllm(name: str, src: Path, folder: Path, docs: dict, threads: int, batch: int) -> list[dict]:
    import torch

    from streamfilter.models import AskLLMScorer
    from streamfilter.models.askllm import make_prompt
    from streamfilter.models.reference import TorchAskLLM

    torch.set_num_threads(threads)
    eager = TorchAskLLM.load(str(src))
    scorers = {v: AskLLMScorer.load(folder, variant=v, intra_op_threads=threads) for v in ("fp32", "int8")}
    rows = []
    for set_name, texts in docs.items():
        tokens = sum(len(x) for x in scorers["fp32"].prompt_ids(texts))
        prompts = [make_prompt(t) for t in texts]
        scorers["fp32"].score(texts[:2], batch_size=batch)  # warm-up
        results = {
            "onnx fp32": timed(lambda: scorers["fp32"].score(texts, batch_size=batch)),
            "onnx int8": timed(lambda: scorers["int8"].score(texts, batch_size=batch)),
            "pytorch eager fp32": timed(lambda: eager.log_p_yes(prompts, batch_size=batch)),
        }
        from scipy.stats import kendalltau

        l32, l8 = scorers["fp32"].log_score(texts), scorers["int8"].log_score(texts)
        for runtime, seconds in results.items():
            rows.append({"model": name, "docs": set_name, "runtime": runtime, "n": len(texts), "tokens": tokens,
                         "docs_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds,
                         "vs_eager": results["pytorch eager fp32"] / seconds})
        rows[-1]["int8_max_abs_dp"] = float(np.max(np.abs(np.exp(l32) - np.exp(l8))))
        rows[-1]["int8_kendall_tau"] = float(kendalltau(l32, l8).statistic)
    return rows


def bench_embedder(name: str, src: Path, folder: Path, docs: dict, threads: int, batch: int) -> list[dict]:
    import torch
    from sentence_transformers import SentenceTransformer

    from streamfilter.models import SentenceEmbedder

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(src), device="cpu")
    embs = {v: SentenceEmbedder.load(folder, variant=v, intra_op_threads=threads) for v in ("fp32", "int8")}
    rows = []
    for set_name, texts in docs.items():
        tokens = sum(len(x) for x in embs["fp32"].token_ids(texts))
        embs["fp32"].embed(texts[:2])
        results = {
            "onnx fp32": timed(lambda: embs["fp32"].embed(texts, batch_size=batch)),
            "onnx int8": timed(lambda: embs["int8"].embed(texts, batch_size=batch)),
            "pytorch eager fp32 (st.encode)": timed(lambda: st.encode(texts, batch_size=batch, show_progress_bar=False)),
        }
        cos = float(np.mean(np.sum(embs["fp32"].embed(texts) * embs["int8"].embed(texts), axis=1)))
        for runtime, seconds in results.items():
            rows.append({"model": name, "docs": set_name, "runtime": runtime, "n": len(texts), "tokens": tokens,
                         "docs_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds,
                         "vs_eager": results["pytorch eager fp32 (st.encode)"] / seconds})
        rows[-1]["int8_mean_cosine"] = cos
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="flan-t5-small,flan-t5-base,sentence-t5-base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-models")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        src, folder = build(name, args.cache)
        print(f"# {name}: model ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        docs = document_sets(*DOCS[name])
        fn = bench_askllm if name.startswith("flan") else bench_embedder
        rows += fn(name, src, folder, docs, args.threads, args.batch_size)
    print(f"| model | documents | runtime | docs/s | tokens/s | x eager |")
    print(f"|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['docs']} (n={r['n']}, {r['tokens'] / r['n']:.0f} tok/doc) | {r['runtime']} | "
              f"{r['docs_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['vs_eager']:.2f} |")
    for r in rows:
        if "int8_max_abs_dp" in r:
            print(f"- {r['model']} / {r['docs']}: int8 vs fp32 max |ΔP(yes)| = {r['int8_max_abs_dp']:.2e}, Kendall tau of "
                  f"log P(yes) = {r['int8_kendall_tau']:.3f} (random weights: P(yes) is ~0 everywhere)")
        if "int8_mean_cosine" in r:
            print(f"- {r['model']} / {r['docs']}: int8 vs fp32 mean cosine = {r['int8_mean_cosine']:.4f} (random weights)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
