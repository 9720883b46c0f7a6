"""`streamfilter snapshot list | inspect | verify | merge` on snapshot files (no Kafka)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamfilter.commands import main
from streamfilter.density.snapshot_store import SnapshotStore
from streamfilter.density.state import SketchState

from .conftest import build_snapshot, scored_records


def snapshot_of(records, directory, offsets):
    return build_snapshot(records, directory, offsets=offsets)


@pytest.fixture
def two_aggregators(tmp_path):
    """Two aggregators' snapshots over disjoint partitions of one stream."""
    records = scored_records(1200, seed=11)
    a = snapshot_of(records[:700], tmp_path / "a", {("crawl.scored", 0): 700})
    b = snapshot_of(records[700:], tmp_path / "b", {("crawl.scored", 1): 500})
    return records, a, b


def run(capsys, *args):
    code = main(["snapshot", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_inspect_and_verify(tmp_path, capsys):
    records = scored_records(800, seed=12)
    path = build_snapshot(records, tmp_path / "snaps", offsets={("crawl.scored", 0): 800})
    micros = path.name.split("-")[1]
    corrupt = tmp_path / "snaps" / path.name.replace(micros, str(int(micros) + 1).zfill(len(micros)))
    corrupt.write_bytes(path.read_bytes()[:-10])  # truncated, and newer by name
    assert SnapshotStore(tmp_path / "snaps").list()[0] == corrupt

    code, out, _ = run(capsys, "list", "--dir", str(tmp_path / "snaps"))
    assert code == 0 and "800" in out and "100x2000" in out and "CORRUPT" in out

    # `latest` skips the corrupt file; the configured policy's threshold and c are shown
    code, out, _ = run(capsys, "inspect", "--dir", str(tmp_path / "snaps"), "--set", "policy.keep_rate=0.3",
                       "--set", "policy.quality_keep=0.6")
    assert code == 0
    for text in ("documents  800", "R=100 rows x B=2000 buckets", "Ask-LLM    800 scores", "p50",
                 "P(yes) threshold", "IPS c", "crawl.scored[0]<800", "ago"):
        assert text in out, text

    code, out, _ = run(capsys, "inspect", str(path), "--json")
    summary = json.loads(out)
    assert summary["documents"] == 800 and summary["sketch"]["dim"] == 32
    assert summary["askllm"]["quantiles"]["p10"] < summary["askllm"]["quantiles"]["p90"]
    assert summary["offsets"] == [{"topic": "crawl.scored", "partition": 0, "next_offset": 800}]

    code, out, _ = run(capsys, "verify", "--dir", str(tmp_path / "snaps"))
    assert code == 1 and out.count("ok ") == 1 and "CORRUPT" in out and "truncated" in out
    code, out, _ = run(capsys, "verify", str(path))
    assert code == 0


def test_inspect_plot_writes_a_png(tmp_path, capsys):
    path = build_snapshot(scored_records(600, seed=13), tmp_path)
    png = tmp_path / "pictures" / "snapshot.png"
    code, out, _ = run(capsys, "inspect", str(path), "--plot", str(png), "--set", "policy.name=askllm+density")
    assert code == 0 and f"plot       {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_merge_adds_disjoint_aggregators(two_aggregators, tmp_path, capsys):
    records, a, b = two_aggregators
    out_dir = tmp_path / "merged"
    out_dir.mkdir()
    code, out, _ = run(capsys, "merge", str(a), str(b), "--output", str(out_dir))
    assert code == 0 and "1200 documents" in out
    merged = SnapshotStore(out_dir).latest()
    assert merged.doc_count == 1200
    assert merged.offsets == {("crawl.scored", 0): 700, ("crawl.scored", 1): 500}
    # merging equals one sketch of the whole stream
    whole = SketchState.create(32, rows=100, buckets=2000)
    whole.on_batch([r.document.id for r in records], np.stack([r.embedding for r in records]).astype(np.float32),
                   np.array([r.askllm for r in records]), [("t", 0, i) for i in range(len(records))])
    assert np.array_equal(merged.sketch.counters, whole.sketch.counters)
    assert merged.quantiles.count == 1200


def test_merge_refuses_incompatible_snapshots_with_one_line(two_aggregators, tmp_path, capsys):
    _, a, b = two_aggregators
    other = build_snapshot(scored_records(100, seed=14), tmp_path / "other", rows=50)
    code, _, err = run(capsys, "merge", str(a), str(other), "--output", str(tmp_path / "m.sfsnap"))
    assert code != 0 and err.count("\n") == 1
    assert err.startswith("streamfilter snapshot: error: cannot merge") and "rows (100 != 50)" in err
    again = build_snapshot(scored_records(100, seed=15), tmp_path / "again", offsets={("crawl.scored", 0): 100})
    code, _, err = run(capsys, "merge", str(a), str(again), "--output", str(tmp_path / "m.sfsnap"))
    assert code != 0 and "crawl.scored[0]" in err and "count twice" in err
    assert not (tmp_path / "m.sfsnap").exists()
    code, _, _ = run(capsys, "merge", str(a), str(again), "--allow-overlap", "--output", str(tmp_path / "m.sfsnap"))
    assert code == 0 and SnapshotStore(tmp_path).load(tmp_path / "m.sfsnap").doc_count == 800
