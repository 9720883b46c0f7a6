"""Policy comparison over the same documents (pure)."""

from __future__ import annotations

import math

import numpy as np

from streamfilter.policies import Decision
from streamfilter.records import Document
from streamfilter.replay.compare import Comparison, field_value, format_report


def decisions(keep: list[bool], askllm: list[float], density: float = math.nan) -> list[Decision]:
    return [Decision(k, 1.0 if k else 0.0, a, density, "p", "") for k, a in zip(keep, askllm)]


def docs(topics: list[str | None]) -> list[Document]:
    return [Document(id=str(i), text="x", lang="en", meta=None if t is None else {"topic": t})
            for i, t in enumerate(topics)]


def test_keep_rates_jaccard_and_shares():
    documents = docs(["a", "a", "b", "b", "b", None])
    score = [0.9, 0.1, 0.8, 0.2, 0.7, 0.5]
    a = decisions([True, False, True, False, True, False], score)
    b = decisions([True, True, False, False, True, False], score)
    comparison = Comparison(["A", "B"], [0.5, 0.5])
    comparison.add(documents[:3], [a[:3], b[:3]])  # in two batches: counts accumulate
    comparison.add(documents[3:], [a[3:], b[3:]])
    report = comparison.report()
    assert report["documents"] == 6
    assert [p["kept"] for p in report["policies"]] == [3, 3]
    overlap = report["overlap"][0]
    assert (overlap["both"], overlap["only_a"], overlap["only_b"]) == (2, 1, 1)
    assert overlap["jaccard"] == 2 / 4
    shares = {row["value"]: row["kept_share"] for row in report["by"]["meta.topic"]}
    assert shares == {"a": [0.5, 1.0], "b": [2 / 3, 1 / 3], "(none)": [0.0, 0.0]}
    kept = report["policies"][0]["askllm"]["kept"]
    assert kept["count"] == 3 and np.isclose(kept["mean"], 0.8)
    assert report["policies"][0]["density"]["kept"] == {"count": 0}  # no density: no distribution
    text = format_report(report)
    assert "Jaccard 0.500" in text and "kept share by meta.topic" in text and "density score" not in text


def test_fields_absent_everywhere_are_not_broken_down():
    comparison = Comparison(["A"], [0.5], by=["meta.source", "lang"])
    comparison.add(docs(["a", "b"]), [decisions([True, False], [0.1, 0.2])])
    assert list(comparison.report()["by"]) == ["lang"]


def test_field_values():
    d = Document(id="1", text="t", lang="de", meta={"topic": "x", "site": {"host": "h"}})
    assert [field_value(d, f) for f in ("lang", "meta.topic", "meta.site.host", "meta.nope", "url")] == \
        ["de", "x", "h", "(none)", "(none)"]


def test_many_values_are_capped():
    comparison = Comparison(["A"], [1.0], max_values=3)
    topics = [f"t{i}" for i in range(10)]
    comparison.add(docs(topics), [decisions([True] * 10, [0.5] * 10)])
    values = {row["value"]: row["documents"] for row in comparison.report()["by"]["meta.topic"]}
    assert values == {"t0": 1, "t1": 1, "t2": 1, "(other)": 7}
