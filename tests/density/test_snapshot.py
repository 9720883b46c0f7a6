"""Snapshot files: bit-exact round trip, checksum/truncation/version detection, atomic store."""

from __future__ import annotations

import logging
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamfilter.density.snapshot import MAGIC, Snapshot, SnapshotCorrupt
from streamfilter.density.snapshot_store import SnapshotStore
from streamfilter.density.state import SketchState


def small_state(n: int = 60, seed: int = 0, dim: int = 8) -> SketchState:
    rng = np.random.default_rng(seed)
    state = SketchState.create(dim, rows=6, buckets=40, k=2, width=0.8, seed=seed, policy_seed=3, reservoir_size=16)
    if n:
        x = rng.standard_normal((n, dim)).astype(np.float16)
        state.on_batch([f"doc-{seed}-{i}" for i in range(n)], x, rng.random(n),
                       [("crawl.scored", i % 3, 100 + i // 3) for i in range(n)])
    return state


def test_snapshot_contains_the_state():
    snap = small_state().snapshot()
    assert snap.doc_count == 60 and snap.sketch.count == 60 and snap.quantiles.count == 60
    assert snap.offsets == {("crawl.scored", 0): 120, ("crawl.scored", 1): 120, ("crawl.scored", 2): 120}
    assert len(snap.reservoir) == 16 and snap.policy_seed == 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 80), seed=st.integers(0, 1000))
def test_round_trip_is_bit_exact(n, seed):
    snap = small_state(n, seed).snapshot()
    snap.ips_constants["density:keep=0.2:quality=None"] = 0.123456789
    data = snap.to_bytes()
    again = Snapshot.from_bytes(data)
    assert again.to_bytes() == data
    assert again.offsets == snap.offsets and again.snapshot_id == snap.snapshot_id
    assert np.array_equal(again.sketch.counters, snap.sketch.counters)
    assert np.array_equal(again.sketch.projections, snap.sketch.projections)
    assert again.sketch.params_equal(snap.sketch)
    assert np.array_equal(again.reservoir.embeddings, snap.reservoir.embeddings)


def test_every_kind_of_damage_is_detected():
    data = small_state().snapshot().to_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    cases = {
        "checksum": bytes(flipped),
        "truncated": data[:-10],
        "header": data[:12],
        "magic": b"XXXXXXXX" + data[8:],
        "version": data[:8] + struct.pack("<I", 99) + data[12:],
    }
    for expected, damaged in cases.items():
        with pytest.raises(SnapshotCorrupt, match=expected.replace("header", "truncated")):
            Snapshot.from_bytes(damaged)
    assert data.startswith(MAGIC)


def test_store_writes_atomically_keeps_newest_and_skips_corrupt(tmp_path, caplog):
    store = SnapshotStore(tmp_path / "snaps", keep=3)
    assert store.latest() is None
    state = small_state()
    paths = []
    for i in range(5):
        snap = state.snapshot()
        snap.created_at = 1_700_000_000 + i  # distinct, ordered creation times
        paths.append(store.write(snap))
    assert store.list() == paths[::-1][:3]  # newest first, two pruned
    assert not [p for p in (tmp_path / "snaps").iterdir() if p.suffix == ".tmp"]
    # corrupt the newest (flip a byte) and truncate the second: latest falls back to the third
    raw = bytearray(paths[4].read_bytes())
    raw[-1] ^= 0xFF
    paths[4].write_bytes(bytes(raw))
    with open(paths[3], "r+b") as fh:
        fh.truncate(os.path.getsize(paths[3]) // 2)
    with caplog.at_level(logging.WARNING):
        latest = store.latest()
    assert latest is not None and latest.created_at == 1_700_000_002
    assert store.corrupt_skipped == 2
    assert "checksum" in caplog.text and "truncated" in caplog.text


def test_stale_temp_files_are_ignored(tmp_path):
    store = SnapshotStore(tmp_path)
    (tmp_path / ".snapshot-00000000000000000001-x.sfsnap.1.tmp").write_bytes(b"half a snapshot")
    assert store.latest() is None and store.corrupt_skipped == 0


def _packb_reference(snap: Snapshot) -> bytes:
    """The file as the first writer built it (one msgpack.packb of the whole payload): streamed files must match it."""
    import hashlib
    import io

    import msgpack

    from streamfilter.density.snapshot import _HEADER, FORMAT_VERSION

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, np.asarray(a, order="C"), allow_pickle=False)
        return buf.getvalue()

    arrays = {f"sketch.{k}": v for k, v in snap.sketch.to_arrays().items()}
    arrays.update({"reservoir.priorities": snap.reservoir.priorities, "reservoir.embeddings": snap.reservoir.embeddings,
                   "reservoir.askllm": snap.reservoir.askllm})
    meta = {"snapshot_id": snap.snapshot_id, "created_at": float(snap.created_at),
            "offsets": [[t, int(p), int(o)] for (t, p), o in sorted(snap.offsets.items())],
            "doc_count": int(snap.doc_count), "policy_seed": int(snap.policy_seed),
            "reservoir_size": int(snap.reservoir.size), "reservoir_seed": int(snap.reservoir.seed),
            "ips_constants": {k: float(v) for k, v in sorted(snap.ips_constants.items())}}
    payload = msgpack.packb({"meta": meta, "arrays": {k: npy(v) for k, v in arrays.items()},
                             "quantiles": snap.quantiles.to_bytes(),
                             **({"perplexity_quantiles": snap.perplexity_quantiles.to_bytes()}
                                if snap.perplexity_quantiles.count else {})}, use_bin_type=True)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize("n", [0, 60])
def test_a_streamed_file_is_the_format_of_one_packed_payload(tmp_path, n):
    # Snapshots are hashed while written, array by array; the bytes are those older builds wrote and read.
    state = small_state(n)
    if n:
        state.perplexity_quantiles.update(np.linspace(1, 3, n))
    snap = state.snapshot()
    snap.ips_constants["density:keep=0.2:quality=None"] = 0.5
    path = SnapshotStore(tmp_path).write(snap)
    assert path.read_bytes() == _packb_reference(snap) == snap.to_bytes()
    again = SnapshotStore(tmp_path).load(path)
    assert again.snapshot_id == snap.snapshot_id and np.array_equal(again.sketch.counters, snap.sketch.counters)
    # and a damaged streamed file is still caught by its checksum
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        SnapshotStore(tmp_path).load(path)
