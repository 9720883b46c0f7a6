"""The score stage alone (no Kafka): what leaves it for one bad document, while the rest of the batch goes on."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from streamfilter.config import Config
from streamfilter.records import Document, decode_scored, encode_document
from streamfilter.stages import ScoreTransform


class _Models:
    """A scorer and embedder pair whose outputs are NaN or inf for marked texts (an fp16 overflow)."""

    model_id, dim = "fake@1", 4

    def score(self, texts, batch_size=16):
        return np.array([np.nan if "NAN-SCORE" in t else 0.5 for t in texts], dtype=np.float32)

    def embed(self, texts, batch_size=16):
        out = np.ones((len(texts), self.dim), dtype=np.float16)
        out[[i for i, t in enumerate(texts) if "INF-EMBEDDING" in t], 1] = np.inf
        return out


def _records(texts):
    return [SimpleNamespace(value=encode_document(Document(id=f"d{i}", text=t)), topic="crawl.raw", partition=0,
                            offset=i, headers=[], key=None) for i, t in enumerate(texts)]


def test_a_non_finite_model_output_sends_that_document_alone_to_the_dlq():
    config = Config()
    texts = ["a river", "NAN-SCORE here", "a mountain", "INF-EMBEDDING here", "a lake"]
    outputs = ScoreTransform.from_config(config, scorer=_Models(), embedder=_Models())(_records(texts))
    scored = [decode_scored(o.value).document.id for o in outputs if o.topic == config.topics.scored]
    dlq = [o for o in outputs if o.topic == config.topics.dlq]
    assert scored == ["d0", "d2", "d4"]
    assert [dict(o.headers)["sf-source-offset"] for o in dlq] == [b"1", b"3"]
    assert {dict(o.headers)["sf-dlq-reason"] for o in dlq} == {b"model_error"}
    assert [o.value for o in dlq] == [_records(texts)[1].value, _records(texts)[3].value]
