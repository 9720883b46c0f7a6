"""Comparing policies over the same documents (pure: no Kafka).

For each policy: the keep rate against its target, Ask-LLM and density score distributions
of kept vs rejected documents; for each pair: the overlap of their kept sets (Jaccard);
and, per metadata value (`meta.topic`, `lang`, ...), the share of documents each policy
keeps. Everything streams in bounded memory: both policies decide every batch, so the
overlap is counted per document without storing id sets, and distributions are KLL
quantile sketches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from streamfilter.density.quantiles import ScoreQuantiles
from streamfilter.records import Document

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
OTHER = "(other)"
MISSING = "(none)"


def field_value(document: Document, path: str) -> str:
    """A document's value at `path`: `lang`, `url`, `meta.KEY` (nested: `meta.a.b`); "(none)" when absent."""
    head, _, rest = path.partition(".")
    if head == "meta":
        value = document.meta
        for key in rest.split(".") if rest else ():
            value = value.get(key) if isinstance(value, dict) else None
    elif head in ("lang", "url", "id", "fetched_at") and not rest:
        value = getattr(document, head)
    else:
        raise ValueError(f"unknown field {path!r}: use lang, url or meta.KEY")
    if value is None or isinstance(value, (dict, list)):
        return MISSING
    return str(value)


@dataclass
class Distribution:
    """Count, mean and quantiles of finite scores."""

    quantiles: ScoreQuantiles = field(default_factory=ScoreQuantiles)
    total: float = 0.0

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if values.size:
            self.quantiles.update(values)
            self.total += float(values.sum())

    def summary(self) -> dict:
        n = self.quantiles.count
        if n == 0:
            return {"count": 0}
        return {"count": n, "mean": self.total / n,
                **{f"p{int(q * 100)}": self.quantiles.quantile(q) for q in QUANTILES}}


@dataclass
class PolicyTally:
    label: str
    target_keep_rate: float
    kept: int = 0
    askllm_kept: Distribution = field(default_factory=Distribution)
    askllm_rejected: Distribution = field(default_factory=Distribution)
    density_kept: Distribution = field(default_factory=Distribution)
    density_rejected: Distribution = field(default_factory=Distribution)


class Comparison:
    """Accumulates decisions of one or more policies on the same documents."""

    def __init__(self, labels: Sequence[str], target_keep_rates: Sequence[float], by: Sequence[str] = ("meta.topic",),
                 max_values: int = 1000):
        self.policies = [PolicyTally(label, rate) for label, rate in zip(labels, target_keep_rates)]
        self.by = list(by)
        self.max_values = max_values
        self.documents = 0
        k = len(self.policies)
        self.both_kept = np.zeros((k, k), dtype=np.int64)  # [i, j]: kept by i and by j
        self.groups: dict[str, dict[str, np.ndarray]] = {path: {} for path in self.by}  # value -> [n, kept_i...]

    def add(self, documents: Sequence[Document], decisions: Sequence[Sequence]) -> None:
        """documents [n]; decisions[i] the n `Decision`s of policy i, in the same order."""
        n = len(documents)
        if n == 0:
            return
        keep = np.array([[d.keep for d in per] for per in decisions], dtype=bool).reshape(len(self.policies), n)
        self.documents += n
        self.both_kept += keep.astype(np.int64) @ keep.T.astype(np.int64)
        for tally, per, kept in zip(self.policies, decisions, keep):
            askllm = np.fromiter((d.askllm for d in per), dtype=np.float64, count=n)
            density = np.fromiter((d.density for d in per), dtype=np.float64, count=n)
            tally.kept += int(kept.sum())
            tally.askllm_kept.add(askllm[kept])
            tally.askllm_rejected.add(askllm[~kept])
            tally.density_kept.add(density[kept])
            tally.density_rejected.add(density[~kept])
        for path, values in self.groups.items():
            for i, document in enumerate(documents):
                value = field_value(document, path)
                counts = values.get(value)
                if counts is None:
                    if len(values) >= self.max_values:
                        value = OTHER
                    counts = values.setdefault(value, np.zeros(1 + len(self.policies), dtype=np.int64))
                counts[0] += 1
                counts[1:] += keep[:, i]

    def report(self) -> dict:
        n = self.documents
        policies = []
        for tally in self.policies:
            policies.append({
                "policy": tally.label, "target_keep_rate": tally.target_keep_rate, "documents": n,
                "kept": tally.kept, "keep_rate": tally.kept / n if n else math.nan,
                "askllm": {"kept": tally.askllm_kept.summary(), "rejected": tally.askllm_rejected.summary()},
                "density": {"kept": tally.density_kept.summary(), "rejected": tally.density_rejected.summary()},
            })
        overlaps = []
        for i in range(len(self.policies)):
            for j in range(i + 1, len(self.policies)):
                both = int(self.both_kept[i, j])
                union = int(self.both_kept[i, i] + self.both_kept[j, j]) - both
                overlaps.append({"a": self.policies[i].label, "b": self.policies[j].label, "both": both,
                                 "only_a": int(self.both_kept[i, i]) - both, "only_b": int(self.both_kept[j, j]) - both,
                                 "jaccard": both / union if union else math.nan})
        groups = {}
        for path, values in self.groups.items():
            if set(values) <= {MISSING}:
                continue  # the field is absent everywhere: nothing to break down
            rows = sorted(values.items(), key=lambda kv: (-int(kv[1][0]), kv[0]))
            groups[path] = [{"value": value, "documents": int(c[0]),
                             "kept_share": [int(k) / int(c[0]) for k in c[1:]]} for value, c in rows]
        return {"documents": n, "policies": policies, "overlap": overlaps, "by": groups}


def format_report(report: dict, max_rows: int = 20) -> str:
    """The report as aligned plain text."""
    out = [f"{report['documents']} documents"]
    labels = [p["policy"] for p in report["policies"]]
    width = max([len(label) for label in labels] + [6])
    out.append("")
    out.append(f"{'policy':<{width}}  {'kept':>8}  {'keep rate':>9}  {'target':>6}")
    for p in report["policies"]:
        out.append(f"{p['policy']:<{width}}  {p['kept']:>8}  {_pct(p['keep_rate']):>9}  {_pct(p['target_keep_rate']):>6}")
    for o in report["overlap"]:
        out.append("")
        out.append(f"overlap of kept sets: Jaccard {_num(o['jaccard'], '{:.3f}')} (both {o['both']}, only {o['a']} "
                   f"{o['only_a']}, only {o['b']} {o['only_b']})")
    for score in ("askllm", "density"):
        rows = [(p["policy"], side, p[score][side]) for p in report["policies"] for side in ("kept", "rejected")
                if p[score]["kept"]["count"] + p[score]["rejected"]["count"]]  # policies without density: none
        if not rows:
            continue
        out.append("")
        name = "Ask-LLM P(yes)" if score == "askllm" else "density score"
        out.append(f"{name:<{width + 10}}  {'count':>8}  {'mean':>8}" + "".join(f"  {f'p{int(q * 100)}':>8}"
                                                                          for q in QUANTILES))
        fmt = "{:.3f}" if score == "askllm" else "{:.4g}"
        for label, side, s in rows:
            if s["count"] == 0:
                out.append(f"{label:<{width}} {side:>9}  {0:>8}")
                continue
            out.append(f"{label:<{width}} {side:>9}  {s['count']:>8}  {_num(s['mean'], fmt):>8}"
                       + "".join(f"  {_num(s[f'p{int(q * 100)}'], fmt):>8}" for q in QUANTILES))
    for path, rows in report["by"].items():
        out.append("")
        shown = rows[:max_rows]
        vwidth = max([len(r["value"][:40]) for r in shown] + [len(path)])
        out.append(f"kept share by {path}:")
        widths = [max(len(label), 7) for label in labels]
        out.append(f"{path:<{vwidth}}  {'docs':>7}" + "".join(f"  {label:>{w}}" for label, w in zip(labels, widths)))
        for r in shown:
            out.append(f"{r['value'][:40]:<{vwidth}}  {r['documents']:>7}"
                       + "".join(f"  {_pct(s):>{w}}" for s, w in zip(r["kept_share"], widths)))
        if len(rows) > max_rows:
            out.append(f"... {len(rows) - max_rows} more values (--json has them all)")
    return "\n".join(out)


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _num(x: float, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)
