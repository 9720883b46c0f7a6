"""The route stage alone (no Kafka): which snapshot it decides with, and what it reads to find out."""

from __future__ import annotations

import numpy as np

from streamfilter.config import Config, load_config
from streamfilter.density.snapshot_store import SnapshotHandoff, SnapshotStore
from streamfilter.density.state import SketchState
from streamfilter.stages import RouteTransform, SketchAggregator


def _config(tmp_path, *overrides: str, **route) -> Config:
    return load_config(env={}, overrides=[
        f"sketch.snapshot_dir={tmp_path / 'snapshots'}", "sketch.rows=20", "sketch.buckets=200",
        "policy.keep_rate=0.3", "policy.quality_keep=0.6",
        "route.min_snapshot_docs=1",  # snapshots of a few dozen documents
        *(f"route.{key}={value}" for key, value in route.items()), *overrides])


def _state(config: Config, n: int = 50, start: int = 0) -> SketchState:
    from streamfilter.config import build_policy

    rng = np.random.default_rng(start)
    state = SketchState.create(8, rows=config.sketch.rows, buckets=config.sketch.buckets, reservoir_size=32,
                               policies=[build_policy(config)])
    state.on_batch([f"d{i}" for i in range(start, start + n)], rng.standard_normal((n, 8)).astype(np.float32),
                   rng.random(n), [("crawl.scored", 0, i) for i in range(start, start + n)])
    return state


class _CountingStore(SnapshotStore):
    loads = 0

    def load(self, path):
        type(self).loads += 1
        return super().load(path)


def test_an_unchanged_newest_snapshot_is_not_read_again(tmp_path):
    config = _config(tmp_path)
    store = SnapshotStore(config.sketch.snapshot_dir)
    store.write(_state(config).snapshot())
    route = RouteTransform.from_config(config)
    route.store = _CountingStore(config.sketch.snapshot_dir)
    _CountingStore.loads = 0
    for _ in range(5):  # the route looks every snapshot_poll_s
        assert route._refresh()
    assert _CountingStore.loads == 1
    newer = _state(config, 80).snapshot()
    newer.created_at += 1
    store.write(newer)
    assert route._refresh() and route.prepared.snapshot_id == newer.snapshot_id
    assert _CountingStore.loads == 2


def test_a_handed_over_snapshot_is_adopted_without_reading_its_file(tmp_path):
    config = _config(tmp_path)
    handoff = SnapshotHandoff()
    sketch = SketchAggregator(config, handoff=handoff)
    sketch.state = _state(config)
    sketch.consumer = None
    sketch._commit_for_lag = lambda offsets: None
    route = RouteTransform.from_config(config, handoff=handoff)
    route.store = _CountingStore(config.sketch.snapshot_dir)
    _CountingStore.loads = 0
    sketch.write_snapshot()
    assert handoff.version == 1
    route.wait_for_snapshot()
    assert route.prepared is not None and _CountingStore.loads == 0
    assert route.prepared.snapshot_id == SnapshotStore(config.sketch.snapshot_dir).latest().snapshot_id


def test_a_snapshot_read_from_disk_is_still_verified(tmp_path):
    # A route without the handoff (its own process) never trusts a file: a damaged newest one is skipped.
    config = _config(tmp_path)
    store = SnapshotStore(config.sketch.snapshot_dir)
    good = _state(config).snapshot()
    store.write(good)
    bad = _state(config, 80).snapshot()
    bad.created_at += 1
    path = store.write(bad)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    route = RouteTransform.from_config(config, handoff=SnapshotHandoff())  # a handoff that holds nothing: files are read
    assert route._refresh() and route.prepared.snapshot_id == good.snapshot_id
    assert route.store.corrupt_skipped == 1
    assert route._refresh() and route.store.corrupt_skipped == 1  # the damaged file is not re-hashed every poll


def test_the_first_snapshot_is_due_once_the_sketch_is_warm_then_on_the_interval(tmp_path):
    config = _config(tmp_path, "sketch.snapshot_interval_s=30", min_snapshot_docs=40)
    sketch = SketchAggregator(config)
    sketch._commit_for_lag = lambda offsets: None
    assert not sketch.snapshot_due(0.0)  # nothing counted
    sketch.state, sketch._dirty = _state(config, 30), True
    assert not sketch.snapshot_due(5.0)  # below route.min_snapshot_docs: the route could not use it
    assert sketch.snapshot_due(30.0)  # the interval still applies (a restart resumes from it)
    sketch.state, sketch._dirty = _state(config, 40), True
    assert sketch.snapshot_due(0.0)  # warm: at once, not 30 s later
    sketch.write_snapshot()
    sketch._dirty = True
    assert not sketch.snapshot_due(5.0) and sketch.snapshot_due(30.0)
