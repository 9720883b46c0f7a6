"""Snapshots for people: what `snapshot inspect` prints and draws, and whether a snapshot fits a configuration.

`summarize` gathers the summary (parameters, documents, age, Ask-LLM and density quantiles,
IPS constants, offsets, and a policy's thresholds); `plot_snapshot` draws the two pictures
people look at instead of quantiles; `config_mismatch` says how a snapshot's sketch differs
from the configured one (a replay refuses such a snapshot). Finding and writing snapshots is
`snapshot_store`; merging them is `state.merge_snapshots`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from streamfilter.density.snapshot import Snapshot
from streamfilter.errors import UserError

SUMMARY_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def expected_parameters(config) -> dict:
    """The sketch parameters the configuration describes (0 = the density package's default; a width of 0
    is calibrated on the stream, so any stored width matches it)."""
    from streamfilter.density import race

    s = config.sketch
    return {"rows": s.rows, "buckets": s.buckets, "k": s.k or race.DEFAULT_K, **({"width": s.width} if s.width else {})}


def config_mismatch(snapshot: Snapshot, config) -> str | None:
    """How the snapshot's sketch differs from the configured one (`sketch.*`), or None."""
    expected = expected_parameters(config)
    sketch = snapshot.sketch
    for name, want in expected.items():
        have = getattr(sketch, name)
        if not math.isclose(float(have), float(want), rel_tol=1e-9):
            return f"{name}={have}, the configuration has sketch.{name}={want}"
    return None


def summarize(path: Path, snapshot: Snapshot, policy=None, now: float | None = None) -> dict:
    """What `snapshot inspect` shows; `policy` (a policies.Policy) adds its threshold and IPS constant."""
    now = time.time() if now is None else now
    sketch = snapshot.sketch
    q = snapshot.quantiles
    summary = {
        "file": str(path), "snapshot_id": snapshot.snapshot_id, "created_at": snapshot.created_at,
        "age_s": now - snapshot.created_at, "documents": snapshot.doc_count, "policy_seed": snapshot.policy_seed,
        "sketch": {"dim": sketch.dim, "rows": sketch.rows, "buckets": sketch.buckets, "k": sketch.k,
                   "width": sketch.width, "hash_seed": sketch.seed, "counted": sketch.count,
                   "counters": str(sketch.counters.dtype), "megabytes": sketch.counters.nbytes / 1e6},
        "askllm": {"count": q.count, "rank_error": q.rank_error if q.count else None,
                   "quantiles": {f"p{round(x * 100)}": q.quantile(x) for x in SUMMARY_QUANTILES} if q.count else {}},
        "ips_constants": dict(snapshot.ips_constants),
        "reservoir": {"documents": len(snapshot.reservoir), "capacity": snapshot.reservoir.size},
        "offsets": [{"topic": t, "partition": p, "next_offset": o} for (t, p), o in sorted(snapshot.offsets.items())],
    }
    density = reservoir_density(snapshot)
    if density.size:
        summary["density"] = {f"p{round(x * 100)}": float(np.quantile(density, x)) for x in SUMMARY_QUANTILES}
    if policy is not None:
        summary["policy"] = policy_summary(snapshot, policy)
    return summary


def reservoir_density(snapshot: Snapshot) -> np.ndarray:
    """Density scores of the reservoir (a uniform sample of the stream) under the snapshot's sketch."""
    if len(snapshot.reservoir) == 0:
        return np.empty(0)
    return snapshot.sketch.query(snapshot.reservoir.embeddings)


def policy_summary(snapshot: Snapshot, policy) -> dict:
    from streamfilter.policies import PolicyNotReady

    out = {"name": policy.name, "keep_rate": policy.keep_rate, "quality_keep": policy.quality_keep}
    try:
        prepared = policy.prepare(snapshot)
    except PolicyNotReady as exc:
        out["not_ready"] = str(exc)
        return out
    out["askllm_threshold"] = prepared.quality_threshold
    out["ips_constant"] = prepared.ips_constant
    return out


def age_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def plot_snapshot(snapshot: Snapshot, output: Path, policy) -> Path:
    """Draw the two panels into `output` (PNG); `policy` decides the threshold and the keep curve."""
    try:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notices
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'streamfilter[plot]'") from None
    from streamfilter.policies import PolicyNotReady, build_policy

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    fig.suptitle(f"snapshot {snapshot.snapshot_id}: {snapshot.doc_count} documents")

    q = snapshot.quantiles
    left.set_title("Ask-LLM P(yes)")
    left.set_xlabel("P(yes)")
    left.set_ylabel("documents")
    if q.count:
        edges = np.linspace(0.0, 1.0, 41)
        ranks = np.array([0.0] + [q.rank(x) for x in edges[1:-1]] + [1.0])
        counts = np.diff(ranks) * q.count
        left.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
        if policy.uses_quality:
            try:
                threshold = policy.quality_threshold(snapshot)
                fraction = policy.quality_fraction
                left.axvline(threshold, color="#c44e52", linestyle="--",
                             label=f"{policy.name}: keep top {fraction:.0%}, P(yes) >= {threshold:.3f}")
                left.legend(loc="lower center", fontsize=8)
            except PolicyNotReady:
                pass
    else:
        left.text(0.5, 0.5, "no scores yet", ha="center", transform=left.transAxes)

    density = reservoir_density(snapshot)
    right.set_title(f"density score (reservoir of {density.size})")
    right.set_xlabel("debiased RACE score (log)")
    right.set_ylabel("documents")
    if density.size:
        low, high = max(float(density.min()), 1e-6), max(float(density.max()), 1e-5)
        edges = np.geomspace(low, high * 1.0001, 41)
        right.hist(density, bins=edges, color="#55a868", edgecolor="white")
        right.set_xscale("log")
        right.xaxis.set_minor_formatter(NullFormatter())
        ips = policy if policy.uses_density else build_policy("density", policy.keep_rate, seed=policy.seed)
        try:
            constant = ips.prepare(snapshot).ips_constant
        except PolicyNotReady:
            constant = None
        if constant is not None and np.isfinite(constant):
            curve = right.twinx()
            xs = np.geomspace(low, high * 1.0001, 200)
            curve.plot(xs, np.minimum(1.0, constant / xs), color="#c44e52",
                       label=f"{ips.name}: keep p = min(1, c/score), c = {constant:.4g}")
            curve.set_ylim(0, 1.05)
            curve.set_ylabel("keep probability")
            curve.legend(loc="upper left", fontsize=8)
    else:
        right.text(0.5, 0.5, "empty reservoir", ha="center", transform=right.transAxes)

    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
