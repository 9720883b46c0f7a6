"""`streamfilter models export|build-test-models|score|info`.

Imports nothing heavy at module level: the CLI parser is built on every invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    models = subparsers.add_parser("models", help="export, build, inspect and run the Ask-LLM and embedding models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    exp = sub.add_parser("export", help="export a Hugging Face model with optimum into a model folder")
    exp.add_argument("kind", choices=["askllm", "embedder", "perplexity"],
                     help="askllm: a Flan-T5 or a decoder-only instruct LLM (detected); embedder: a sentence-transformers "
                          "model; perplexity: a decoder-only LM (the paper's perplexity baseline)")
    exp.add_argument("--model", required=True, help="hub id (google/flan-t5-small) or local folder")
    exp.add_argument("--out", required=True, type=Path, help="output folder (e.g. onnx_models/flan-t5-small)")
    exp.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    exp.add_argument("--name", default=None, help="display name used in model ids (default: last path part)")
    exp.add_argument("--variants", default=None, help="comma-separated: fp32,int8[,fp16 for askllm] (default: all)")
    exp.add_argument("--max-tokens", type=int, default=512, help="askllm/perplexity: tokens per input (default 512)")
    exp.add_argument("--opset", type=int, default=None)
    exp.add_argument("--no-validate", action="store_true", help="skip the check against the PyTorch reference")
    exp.set_defaults(handler=_export)

    build = sub.add_parser("build-test-models", help="build the offline test models (tiny T5 Ask-LLM, tiny Sentence-T5, MiniLM, tiny Qwen2 Ask-LLM + perplexity)")
    build.add_argument("--out", type=Path, default=None, help="folder (default: .cache/test-models in the checkout)")
    build.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    build.set_defaults(handler=_build_test_models)

    score = sub.add_parser("score", help="score JSON lines {id, text} from stdin; write {id, askllm[, embedding, perplexity]}")
    score.add_argument("--askllm", type=Path, default=None,
                       help="Ask-LLM model folder (a causal one also writes askllm_variants: P summed over yes/Yes/...)")
    score.add_argument("--perplexity", type=Path, default=None,
                       help="perplexity model folder (adds mean_nll, nats per token, and perplexity = exp(mean_nll))")
    score.add_argument("--embedder", type=Path, default=None, help="embedder model folder (adds 'embedding')")
    score.add_argument("--variant", default=None, help="fp32, int8 or fp16 (default: best for the device)")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--max-tokens", type=int, default=512, help="Ask-LLM prompt length in tokens")
    score.add_argument("--threads", type=int, default=None,
                       help="ONNX Runtime intra-op threads of each inference batch (default: cores / workers)")
    score.add_argument("--workers", type=int, default=None,
                       help="inference batches run at once (default on CPU: one per core, or cores / --threads)")
    score.add_argument("--providers", default=None, help="comma-separated, e.g. cuda,cpu (default: CUDA if present, then CPU)")
    score.add_argument("--log-score", action="store_true", help="also write askllm_log (log P(yes))")
    score.add_argument("--chunk", type=int, default=256, help="documents read before each scoring round")
    score.set_defaults(handler=_score)

    info = sub.add_parser("info", help="show a model folder's manifest and verify its files")
    info.add_argument("model_dir", type=Path)
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    info.set_defaults(handler=_info)


def _export(args: argparse.Namespace) -> int:
    from streamfilter.models import export

    kw = dict(revision=args.revision, name=args.name, opset=args.opset, validate=not args.no_validate)
    if args.variants:
        kw["variants"] = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.kind == "askllm":
        out = export.export_askllm(args.model, args.out, max_tokens=args.max_tokens, **kw)
    elif args.kind == "perplexity":
        out = export.export_causal(args.model, perplexity_out=args.out, max_tokens=args.max_tokens, **kw)["perplexity"]
    else:
        out = export.export_embedder(args.model, args.out, **kw)
    print(out)
    return 0


def _build_test_models(args: argparse.Namespace) -> int:
    from streamfilter.models import testmodels

    root = args.out or testmodels.default_root()
    t0 = time.monotonic()
    paths = testmodels.build_test_models(root) if args.force else testmodels.ensure_test_models(root)
    for field in ("askllm", "sentence_t5", "minilm"):
        print(f"{field}\t{getattr(paths, field)}")
    causal = testmodels.ensure_causal_test_models(root)
    print(f"askllm_causal\t{causal.askllm}\nperplexity\t{causal.perplexity}")
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from streamfilter.models.manifest import load_manifest

    m = load_manifest(args.model_dir)
    if not args.no_verify:
        m.verify_all()
    print(json.dumps({k: v for k, v in m.raw.items()}, indent=2))
    if not args.no_verify:
        print(f"all {len(m.files)} files match their sha256", file=sys.stderr)
    return 0


def _read_jsonl(stream, chunk: int):
    """Yield lists of (line_no, id, text) and of (line_no, error) from JSON lines."""
    batch, errors = [], []
    for line_no, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError("expected an object with a string 'text'")
            batch.append((line_no, obj.get("id", line_no), obj["text"]))
        except ValueError as exc:
            errors.append((line_no, str(exc)))
        if len(batch) >= chunk:
            yield batch, errors
            batch, errors = [], []
    if batch or errors:
        yield batch, errors


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from streamfilter.errors import ConfigError

    if args.askllm is None and args.embedder is None and args.perplexity is None:
        raise ConfigError("models score: give --askllm DIR, --embedder DIR and/or --perplexity DIR")
    from streamfilter.models.askllm_causal import CausalAskLLMScorer
    from streamfilter.models.loader import load_model

    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    runtime = {"providers": providers, "intra_op_threads": args.threads, "workers": args.workers}
    scorer = embedder = ppl = None
    if args.askllm is not None:
        scorer = load_model(args.askllm, kind="askllm", max_tokens=args.max_tokens, variant=args.variant, **runtime)
    if args.perplexity is not None:
        ppl = load_model(args.perplexity, kind="perplexity", max_tokens=args.max_tokens,
                         variant=None if args.variant == "fp16" else args.variant, **runtime)
    if args.embedder is not None:
        embedder = load_model(args.embedder, kind="embedder", variant=None if args.variant == "fp16" else args.variant,
                              **runtime)
    progress = _Progress(enabled=sys.stderr.isatty())
    out = sys.stdout
    n_bad = 0
    for batch, errors in _read_jsonl(sys.stdin, args.chunk):
        for line_no, err in errors:
            n_bad += 1
            print(f"line {line_no}: skipped: {err}", file=sys.stderr)
        if not batch:
            continue
        texts = [t for _, _, t in batch]
        rows = [{"id": doc_id} for _, doc_id, _ in batch]
        if scorer is not None:
            if isinstance(scorer, CausalAskLLMScorer):
                yes_no, variants = scorer.log_probs_all(texts, batch_size=args.batch_size)
                logp = yes_no[:, 0]
                for row, pv in zip(rows, np.exp(variants.astype(np.float64)).sum(axis=1).tolist()):
                    row["askllm_variants"] = pv
            else:
                logp = scorer.log_score(texts, batch_size=args.batch_size)
            for row, li in zip(rows, logp.tolist()):
                row["askllm"] = math.exp(li)
                if args.log_score:
                    row["askllm_log"] = li
        if ppl is not None:
            for row, nll in zip(rows, ppl.mean_nll(texts, batch_size=args.batch_size).tolist()):
                row["mean_nll"] = nll
                row["perplexity"] = math.exp(nll) if math.isfinite(nll) else None
        if embedder is not None:
            emb = embedder.embed(texts, batch_size=args.batch_size)
            for row, vec in zip(rows, emb.tolist()):
                row["embedding"] = vec
        for row in rows:
            out.write(json.dumps(row) + "\n")
        out.flush()
        progress.update(len(batch), sum(len(t) for t in texts))
    progress.close()
    meta = {"askllm": scorer.model_id if scorer else None, "embedder": embedder.model_id if embedder else None,
            "perplexity": ppl.model_id if ppl else None}
    print(f"scored {progress.docs} documents ({n_bad} skipped) with {json.dumps(meta)}", file=sys.stderr)
    return 0 if n_bad == 0 else 3


class _Progress:
    """A one-line progress display on a terminal (nothing when stderr is a pipe)."""

    def __init__(self, enabled: bool):
        self.enabled, self.docs, self.chars, self.t0 = enabled, 0, 0, time.monotonic()

    def update(self, docs: int, chars: int) -> None:
        self.docs += docs
        self.chars += chars
        if self.enabled:
            rate = self.docs / max(1e-9, time.monotonic() - self.t0)
            print(f"\r{self.docs} documents, {rate:.1f} docs/s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)
