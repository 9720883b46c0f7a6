"""Pass 1 (score): raw records → scored records (Ask-LLM P(yes) + float16 embedding) or DLQ entries."""

from __future__ import annotations

import logging

import numpy as np

from streamfilter import metrics
from streamfilter.config import Config, ModelsConfig
from streamfilter.errors import InvalidDocument
from streamfilter.kafka_loop import Output, Outputs
from streamfilter.models.scorer import Embedder, PerplexityModel, QualityScorer
from streamfilter.records import Document, ScoredRecord, carried_headers, decode_raw, encode_scored
from streamfilter.stages.dlq import DlqTarget, add_dlq_output

log = logging.getLogger("streamfilter.stages")


class ScoreTransform:
    """Pass 1: raw records → scored records (Ask-LLM P(yes) + float16 embedding) or DLQ entries."""

    stage = "score"

    def __init__(self, models: ModelsConfig, scored_topic: str, dlq: DlqTarget, *, max_doc_bytes: int,
                 input_headers: str = "*", scorer: QualityScorer | None = None, embedder: Embedder | None = None,
                 perplexity: PerplexityModel | None = None, job: str = "live", stage: str = "score"):
        self.models = models  # what `load` loads, and the inference batch size
        self.scored_topic = scored_topic
        self.dlq = dlq
        self.max_doc_bytes = max_doc_bytes  # larger raw values are too_large
        self.input_headers = input_headers  # `output.input_headers`: which input headers go on
        self.stage = stage  # the metrics' and DLQ headers' stage: "score", or "replay" (rescore)
        self.job = job  # `sf-job` of the scored records: "live", or a replay's job id (rescore)
        self.scorer = scorer  # P(yes) of each text (Ask-LLM)
        self.embedder = embedder  # [n, dim] embeddings of the texts
        self.perplexity = perplexity  # optional: mean NLL of each text

    @classmethod
    def from_config(cls, config: Config, *, scored_topic: str | None = None, dlq_topic: str | None = None,
                    **options) -> "ScoreTransform":
        """The score stage of `config` (a rescore replay names its own output and DLQ topics)."""
        return cls(config.models, scored_topic or config.topics.scored, DlqTarget.of(config, dlq_topic),
                   max_doc_bytes=config.records.max_doc_bytes, input_headers=config.output.input_headers, **options)

    def load(self) -> None:
        """Load the configured models (unless models were given to the constructor)."""
        if self.scorer is not None and self.embedder is not None:
            return
        from streamfilter.models.loader import load_model

        m = self.models
        variant = None if m.variant == "auto" else m.variant
        runtime = {"variant": variant, "intra_op_threads": m.intra_op_threads or None,
                   "workers": m.inference_workers or None, "batch_tokens": m.inference_batch_tokens or None}
        self.scorer = load_model(m.askllm, kind="askllm", max_tokens=m.max_tokens, **runtime)
        self.embedder = load_model(m.embedder, kind="embedder", dtype="float16", **runtime)
        if m.perplexity and self.perplexity is None:
            self.perplexity = load_model(m.perplexity, kind="perplexity", max_tokens=m.max_tokens, **runtime)
        log.info("score: Ask-LLM %s, embedder %s (dim %d)%s, %d inference worker(s)", self.scorer.model_id,
                 self.embedder.model_id, self.embedder.dim,
                 f", perplexity {self.perplexity.model_id}" if self.perplexity else "", self.scorer.workers)

    def __call__(self, records: list) -> Outputs:
        """Scored records and DLQ entries for `records`. Raises `InvalidDocument("model_error")` when a
        model raises on the batch: the loop then splits the batch until the document is alone."""
        outputs = Outputs()
        good: list[tuple[object, Document]] = []
        max_bytes = self.max_doc_bytes
        for record in records:
            try:
                good.append((record, decode_raw(record.value, max_bytes)))
            except InvalidDocument as exc:
                add_dlq_output(outputs, self.dlq, self.stage, exc, record)
        if good:
            scores, embeddings, nlls = self._infer([doc.text for _, doc in good])
            # A model can fail silently on one document (an fp16 overflow): NaN or inf never leaves this stage.
            finite = np.isfinite(np.asarray(scores, dtype=np.float64))
            if np.issubdtype(embeddings.dtype, np.floating):  # anything else fails to encode, record by record
                finite &= np.isfinite(embeddings).all(axis=1)
            scored_topic, scored = self.scored_topic, 0
            for (record, doc), score, embedding, nll, ok in zip(good, scores.tolist(), embeddings, nlls, finite):
                if not ok:
                    add_dlq_output(outputs, self.dlq, self.stage,
                                   InvalidDocument("model_error", "the models gave a non-finite score or embedding"),
                                   record)
                    continue
                record_out = ScoredRecord(doc, score, embedding, self.scorer.model_id, self.embedder.model_id,
                                          (record.topic, record.partition, record.offset), perplexity=nll,
                                          perplexity_model=self.perplexity.model_id if self.perplexity else None)
                try:
                    value = encode_scored(record_out)
                except Exception as exc:  # noqa: BLE001 - one document's fields, not the batch
                    add_dlq_output(outputs, self.dlq, self.stage,
                                   InvalidDocument("unencodable", f"{type(exc).__name__}: {exc}"), record)
                    continue
                outputs.observe(metrics.ASKLLM_SCORE, score)
                # the input's headers go on, and its produce time: the route measures produce-to-decision from it
                headers = [*carried_headers(getattr(record, "headers", None), self.input_headers),
                           ("sf-job", self.job.encode())]
                produced_ms = getattr(record, "timestamp", None)
                if produced_ms is not None and produced_ms >= 0:
                    headers.append(("sf-produced-ms", str(produced_ms).encode()))
                outputs.append(Output(scored_topic, value, key=doc.id.encode(), headers=headers))
                scored += 1
            outputs.count(metrics.DOCUMENTS, (self.stage, "scored"), scored)
        return outputs

    def _infer(self, texts: list[str]):
        """P(yes) [n], embeddings [n, dim] and mean NLLs (or None) [n] of a batch of texts. The models
        run side by side on the process's shared inference workers (`models.run_side_by_side`)."""
        from streamfilter.models.base import run_side_by_side

        batch = self.models.inference_batch_docs
        calls = {"askllm": lambda: self.scorer.score(texts, batch_size=batch),
                 "embedder": lambda: self.embedder.embed(texts, batch_size=batch)}
        if self.perplexity is not None:
            calls["perplexity"] = lambda: self.perplexity.mean_nll(texts, batch_size=batch)
        try:
            results, seconds = run_side_by_side(calls)
        except InvalidDocument:
            raise
        except Exception as exc:  # noqa: BLE001 - a model, tokenizer or runtime error on some document
            raise InvalidDocument("model_error", f"{type(exc).__name__}: {exc}") from exc
        for model, took_s in seconds.items():
            metrics.INFERENCE_SECONDS.labels(model).observe(took_s)
        nll = results.get("perplexity")
        return results["askllm"], results["embedder"], [None] * len(texts) if nll is None else nll.tolist()
