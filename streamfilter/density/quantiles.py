"""Streaming quantiles of Ask-LLM scores: Apache DataSketches' KLL sketch (mergeable, bounded memory).

The `askllm` policy keeps a document when its P(yes) is at least the (1 - q) quantile, so
that the top fraction q of the stream is kept. KLL's rank error at k=200 is about 1.3%
(`rank_error`), so the kept fraction is q within that error.
"""

from __future__ import annotations

import numpy as np
from datasketches import kll_doubles_sketch

DEFAULT_KLL_K = 200


class ScoreQuantiles:
    """A mergeable quantile sketch of float scores."""

    def __init__(self, k: int = DEFAULT_KLL_K, _sketch: kll_doubles_sketch | None = None):
        self._sketch = _sketch if _sketch is not None else kll_doubles_sketch(k)

    @property
    def count(self) -> int:
        return int(self._sketch.n)

    @property
    def k(self) -> int:
        return int(self._sketch.k)

    @property
    def rank_error(self) -> float:
        """Normalised rank error of `quantile` (99% confidence)."""
        return float(self._sketch.normalized_rank_error(False))

    def update(self, scores: np.ndarray) -> None:
        """Add a batch of finite scores (any shape; NaN is rejected because it has no rank)."""
        values = np.ascontiguousarray(np.asarray(scores, dtype=np.float64).reshape(-1))
        if values.size == 0:
            return
        if not np.isfinite(values).all():
            raise ValueError("scores contain NaN or infinity")
        self._sketch.update(values)

    def quantile(self, q: float) -> float:
        """The score at normalised rank q in [0, 1], exclusive (about a fraction q of scores lie below it).

        So `score >= quantile(1 - f)` keeps the top fraction f: on 0..9, quantile(0.5) is 5.
        """
        if self.count == 0:
            raise ValueError("no scores yet: the quantile of an empty sketch is undefined")
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"rank {q} outside [0, 1]")
        return float(self._sketch.get_quantile(q))

    def rank(self, score: float) -> float:
        """Normalised rank of `score` (fraction of scores <= it)."""
        return float(self._sketch.get_rank(score))

    def merge(self, other: "ScoreQuantiles") -> None:
        self._sketch.merge(other._sketch)

    def to_bytes(self) -> bytes:
        return bytes(self._sketch.serialize())

    @classmethod
    def from_bytes(cls, data: bytes) -> "ScoreQuantiles":
        try:
            sketch = kll_doubles_sketch.deserialize(bytes(data))
        except Exception as exc:  # the C++ deserialiser raises IndexError/RuntimeError/ValueError on bad bytes
            raise ValueError(f"not a KLL sketch: {exc}") from exc
        return cls(_sketch=sketch)

    def copy(self) -> "ScoreQuantiles":
        return ScoreQuantiles.from_bytes(self.to_bytes())
