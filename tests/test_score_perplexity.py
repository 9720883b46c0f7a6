"""The score stage writes the optional perplexity (models.perplexity) into scored records."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from streamfilter.config import Config
from streamfilter.records import decode_scored, encode_document, Document
from streamfilter.stages import ScoreTransform


class _Fake:
    def __init__(self, model_id, fn):
        self.model_id, self.fn, self.dim = model_id, fn, 4

    def score(self, texts, batch_size=16):
        return np.array([self.fn(t) for t in texts], dtype=np.float32)

    mean_nll = score  # the perplexity model's signal: the stage calls mean_nll

    def embed(self, texts, batch_size=16):
        return np.ones((len(texts), 4), dtype=np.float16)


def _records(texts):
    return [SimpleNamespace(value=encode_document(Document(id=f"d{i}", text=t)), topic="crawl.raw", partition=0,
                            offset=i, headers=[], key=None) for i, t in enumerate(texts)]


def test_score_stage_adds_perplexity_only_when_configured():
    config = Config()
    askllm, embedder = _Fake("ask@1", lambda t: 0.5), _Fake("emb@1", None)
    ppl = _Fake("ppl@1", lambda t: float(len(t)))
    with_ppl = ScoreTransform.from_config(config, scorer=askllm, embedder=embedder, perplexity=ppl)(_records(["ab", "abcd"]))
    got = [decode_scored(o.value) for o in with_ppl]
    assert [g.perplexity for g in got] == [2.0, 4.0] and {g.perplexity_model for g in got} == {"ppl@1"}
    without = ScoreTransform.from_config(config, scorer=askllm, embedder=embedder)(_records(["ab"]))
    assert decode_scored(without[0].value).perplexity is None


def test_score_histogram_and_counters_move_once_per_committed_batch():
    """A batch transformed twice (its transaction aborted, then read again) is observed once: on apply."""
    from streamfilter import metrics

    def value(name, labels=None):
        return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0

    config = Config()
    stage = ScoreTransform.from_config(config, scorer=_Fake("ask@1", lambda t: 0.93), embedder=_Fake("emb@1", None))
    bucket = {"le": "0.95"}
    before = value("streamfilter_askllm_score_count"), value("streamfilter_askllm_score_bucket", bucket)
    scored = {"stage": stage.stage, "outcome": "scored"}
    docs_before = value("streamfilter_documents_total", scored)
    stage(_records(["a", "b", "c"]))  # aborted: never applied
    retried = stage(_records(["a", "b", "c"]))
    assert value("streamfilter_askllm_score_count") == before[0]
    retried.apply()  # committed
    assert value("streamfilter_askllm_score_count") == before[0] + 3
    assert value("streamfilter_askllm_score_bucket", bucket) == before[1] + 3
    assert value("streamfilter_documents_total", scored) == docs_before + 3
