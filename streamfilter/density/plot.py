"""`snapshot inspect --plot FILE.png`: the two pictures people look at instead of quantiles.

Left: the Ask-LLM P(yes) histogram of the whole stream (from the snapshot's KLL sketch)
with the policy's quality threshold. Right: the density scores of the snapshot's reservoir
(a uniform sample of the stream, log scale) with the inverse-propensity keep probability
min(1, c / score). matplotlib is the optional `plot` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamfilter.density.snapshot import Snapshot
from streamfilter.errors import UserError


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
    from streamfilter.density.policy import PolicyNotReady, build_policy
    from streamfilter.density.snapshots import reservoir_density

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
                fraction = policy.keep_rate if policy.name == "askllm" else policy.quality_keep
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
