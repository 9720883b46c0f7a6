"""Snapshots for people and for replay: find one, check it fits, summarise it, merge several.

`find` resolves what a user types (a path, a snapshot id, or `latest`) against the
configured snapshot directory; `config_mismatch` says how a snapshot's sketch differs from
the one the configuration describes (a replay refuses such a snapshot); `summarize` gathers
what `snapshot inspect` prints; `merge` adds the sketches of several aggregators.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamfilter.density.snapshot import Snapshot, SnapshotCorrupt, SnapshotStore
from streamfilter.errors import UserError

SUMMARY_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def resolve(ref: str, store: SnapshotStore, directory: str | Path) -> Path:
    """The file for `ref`: a path, or a snapshot id in `directory`; UserError otherwise."""
    path = Path(ref)
    if path.is_file():
        return path
    matches = [p for p in store.list() if p.name.endswith(f"-{ref}.sfsnap")]
    if not matches:
        raise UserError(f"snapshot {ref!r}: no such file, and no snapshot with that id in {directory}")
    return matches[0]


def find(ref: str, directory: str | Path) -> tuple[Path, Snapshot]:
    """(path, snapshot) for `latest`, a file path, or a snapshot id in `directory`; UserError otherwise."""
    store = SnapshotStore(directory)
    if ref == "latest":
        for path in store.list():
            try:
                return path, store.load(path)
            except SnapshotCorrupt:
                continue
        raise UserError(f"no valid snapshot in {directory} (sketch.snapshot_dir)")
    path = resolve(ref, store, directory)
    try:
        return path, store.load(path)
    except SnapshotCorrupt as exc:
        raise UserError(f"snapshot {path}: {exc}") from None


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
    """What `snapshot inspect` shows; `policy` (a density.policy.Policy) adds its threshold and IPS constant."""
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
    from streamfilter.density.policy import PolicyNotReady

    out = {"name": policy.name, "keep_rate": policy.keep_rate, "quality_keep": policy.quality_keep}
    try:
        prepared = policy.prepare(snapshot)
    except PolicyNotReady as exc:
        out["not_ready"] = str(exc)
        return out
    out["askllm_threshold"] = prepared.quality_threshold
    out["ips_constant"] = prepared.ips_constant
    return out


def merge(items: Sequence[tuple[Path, Snapshot]], policies=(), allow_overlap: bool = False) -> Snapshot:
    """One snapshot of several aggregators' streams; UserError naming the file that cannot be added."""
    from streamfilter.density.state import SketchState

    if len(items) < 2:
        raise UserError("merge needs at least two snapshots")
    (first_path, first), rest = items[0], items[1:]
    state = SketchState.restore(first, policies=policies)
    seen = {first.snapshot_id: first_path}
    for path, snapshot in rest:
        if snapshot.snapshot_id in seen:
            raise UserError(f"cannot merge {path}: it is snapshot {snapshot.snapshot_id} again ({seen[snapshot.snapshot_id]})")
        mismatch = first.sketch.parameter_mismatch(snapshot.sketch)
        if mismatch is not None:
            raise UserError(f"cannot merge {path}: other sketch parameters than {first_path}: {mismatch}")
        if snapshot.policy_seed != first.policy_seed:
            raise UserError(f"cannot merge {path}: policy seed {snapshot.policy_seed} != {first.policy_seed} "
                            f"of {first_path} (their reservoirs sample differently)")
        overlap = sorted(set(state.offsets) & set(snapshot.offsets))
        if overlap and not allow_overlap:
            topic, partition = overlap[0]
            raise UserError(f"cannot merge {path}: it also covers {topic}[{partition}], so those documents would "
                            "count twice (merge aggregators of disjoint partitions, or pass --allow-overlap)")
        state.merge(SketchState.restore(snapshot))
        seen[snapshot.snapshot_id] = path
    return state.snapshot()


def write(snapshot: Snapshot, output: Path, keep: int = 1_000_000) -> Path:
    """Write into a directory (store naming, so `latest` finds it) or to a file path (atomically)."""
    import os

    if output.is_dir() or str(output).endswith(os.sep):
        return SnapshotStore(output, keep=keep).write(snapshot)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(snapshot.to_bytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, output)
    return output


def age_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
