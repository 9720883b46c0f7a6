"""ScoreQuantiles: the Ask-LLM quality gate keeps the top fraction, also on a drifting stream."""

from __future__ import annotations

import numpy as np
import pytest

from streamfilter.density.quantiles import ScoreQuantiles


def drifting_scores(n: int, seed: int = 0) -> np.ndarray:
    """P(yes)-like scores whose distribution drifts: the crawl gets better, then a junk burst."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, n)
    logits = rng.normal(-1.0 + 3.0 * t, 1.0 + t)
    logits[int(0.7 * n):int(0.8 * n)] -= 4.0  # a burst of junk
    return 1 / (1 + np.exp(-logits))


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5, 0.9])
def test_top_fraction_on_drifting_stream(keep):
    scores = drifting_scores(200_000)
    q = ScoreQuantiles()
    for batch in np.array_split(scores, 97):
        q.update(batch)
    threshold = q.quantile(1 - keep)
    kept = (scores >= threshold).mean()
    assert abs(kept - keep) <= q.rank_error, (kept, keep, q.rank_error)


def test_merge_and_bytes_round_trip():
    scores = drifting_scores(50_000, seed=1)
    a, b, whole = ScoreQuantiles(), ScoreQuantiles(), ScoreQuantiles()
    a.update(scores[:20_000])
    b.update(scores[20_000:])
    whole.update(scores)
    a.merge(b)
    assert a.count == whole.count == 50_000
    for r in (0.1, 0.5, 0.8, 0.95):
        assert abs(a.quantile(r) - np.quantile(scores, r)) < 0.02
    again = ScoreQuantiles.from_bytes(a.to_bytes())
    assert again.to_bytes() == a.to_bytes() and again.quantile(0.8) == a.quantile(0.8)


def test_rejects_nan_empty_and_garbage():
    q = ScoreQuantiles()
    with pytest.raises(ValueError, match="empty"):
        q.quantile(0.5)
    with pytest.raises(ValueError, match="NaN"):
        q.update(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="KLL"):
        ScoreQuantiles.from_bytes(b"not a sketch")
