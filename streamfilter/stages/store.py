"""The configured snapshot store, as both the sketch aggregator and the route open it."""

from __future__ import annotations

from streamfilter import metrics
from streamfilter.config import Config
from streamfilter.density.snapshot_store import SnapshotStore


def open_store(config: Config) -> SnapshotStore:
    """`sketch.snapshot_dir`, keeping `sketch.keep_snapshots`; each corrupt file skipped while looking
    for the newest snapshot counts in `streamfilter_snapshots_corrupt_total`."""
    return SnapshotStore(config.sketch.snapshot_dir, keep=config.sketch.keep_snapshots,
                         on_corrupt=lambda _path, _error: metrics.SNAPSHOTS_CORRUPT.inc())
