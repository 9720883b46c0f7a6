"""Training-ready shards without Kafka: names, columns, both formats, the checkpoint read from a listing."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest

from streamfilter.config import load_config
from streamfilter.errors import ConfigError
from streamfilter.records import Document, ScoredRecord, encode_document
from streamfilter.shards import (
    COLUMNS, ShardName, ShardRows, ShardStore, build_manifest, count_rows, encode_jsonl_zst, encode_parquet,
    write_manifest,
)
from streamfilter.stages.route import decision_headers

Record = namedtuple("Record", "offset value headers timestamp")
TOPIC = "crawl.accepted"


def accepted(doc: Document, offset: int, density: float = 0.25) -> Record:
    """A record as the route writes it to the accepted topic."""
    decision = SimpleNamespace(keep=True, policy="askllm+density", snapshot_id="snap-7", askllm=0.875,
                               density=density, probability=0.5)
    scored = ScoredRecord(doc, 0.875, np.zeros(4, np.float16), "askllm-m", "embedder-m", ("crawl.raw", 2, 100 + offset))
    return Record(offset, encode_document(doc), decision_headers(decision, scored), 1_700_000_000_000 + offset)


def documents(n: int, start: int = 0) -> list[Document]:
    return [Document(id=f"d{i}", text=f"text {i} é", url=f"https://x/{i}" if i % 2 else None, lang="en",
                     fetched_at=[None, 1714560000, 1.5, "2024-05-01T00:00:00Z"][i % 4],
                     meta={"topic": "t", "n": i, "raw": b"\x00\x01", "deep": {"l": [1, None]}} if i % 3 else None)
            for i in range(start, start + n)]


def rows_of(partition: int, start: int, records: list[Record]) -> ShardRows:
    rows = ShardRows(TOPIC, partition, start, max_doc_bytes=1_000_000)
    rows.add(records)
    return rows


def test_a_shard_name_states_topic_partition_and_offset_range():
    name = ShardName("crawl.accepted.v2", 3, 1200, 1800, "parquet")
    assert name.name == "crawl.accepted.v2-p00003-00000000000000001200-00000000000000001800.parquet"
    assert ShardName.parse(name.name) == name
    jsonl = ShardName(TOPIC, 0, 0, 5, "jsonl")
    assert jsonl.name.endswith(".jsonl.zst") and ShardName.parse(jsonl.name) == jsonl
    for other in (f".tmp-{name.name}.abc123", "_SUCCESS-crawl.accepted.parquet.json", name.name + ".part",
                  "crawl.accepted-p00000-00000000000000000005-00000000000000000005.parquet"):  # empty range
        assert ShardName.parse(other) is None


def test_parquet_shard_holds_the_document_the_decision_and_the_coordinates():
    import pyarrow.parquet as pq

    docs = documents(8)
    records = [accepted(d, 10 + i, density=math.nan if i == 0 else 0.25) for i, d in enumerate(docs)]
    rows = rows_of(1, 10, records)
    assert (len(rows), rows.start, rows.end) == (8, 10, 18)
    table = pq.read_table(pa_buffer(encode_parquet(rows, 3)))
    assert table.column_names == list(COLUMNS)
    got = table.to_pylist()
    assert [r["id"] for r in got] == [d.id for d in docs]
    assert got[0]["density"] is None and got[1]["density"] == 0.25  # nan: the policy computed none
    first, second = got[1], got[2]
    assert first["text"] == "text 1 é" and first["url"] == "https://x/1" and second["url"] is None
    assert json.loads(first["meta"]) == {"topic": "t", "n": 1, "raw": {"$base64": "AAE="}, "deep": {"l": [1, None]}}
    assert [r["fetched_at"] for r in got[:4]] == [None, "1714560000", "1.5", "2024-05-01T00:00:00Z"]
    assert (first["decision"], first["policy"], first["snapshot"], first["askllm"], first["probability"]) == (
        "accept", "askllm+density", "snap-7", 0.875, 0.5)
    assert (first["askllm_model"], first["embedder_model"]) == ("askllm-m", "embedder-m")
    assert (first["source_topic"], first["source_partition"], first["source_offset"]) == ("crawl.raw", 2, 111)
    assert (first["kafka_partition"], first["kafka_offset"], first["kafka_timestamp_ms"]) == (1, 11, 1_700_000_000_011)
    assert pq.read_metadata(pa_buffer(encode_parquet(rows, 3))).metadata[b"streamfilter.end"] == b"18"


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


@pytest.mark.skipif(not (shutil.which("zstd") and shutil.which("jq")), reason="needs the zstd and jq commands")
def test_jsonl_shard_reads_with_zstd_and_jq(tmp_path):
    docs = documents(6)
    rows = rows_of(0, 0, [accepted(d, i, density=math.nan if i == 2 else 0.25) for i, d in enumerate(docs)])
    path = tmp_path / ShardName(TOPIC, 0, 0, rows.end, "jsonl").name
    path.write_bytes(encode_jsonl_zst(rows, 3))
    out = subprocess.run(f"zstd -d < {path} | jq -c '[.id, .density, .meta.raw, .fetched_at]'", shell=True,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [json.loads(line)[0] for line in out] == [d.id for d in docs]
    assert json.loads(out[1]) == ["d1", 0.25, {"$base64": "AAE="}, 1714560000]
    assert json.loads(out[2])[1] is None
    assert count_rows(path.read_bytes(), "jsonl") == 6


def test_an_undecodable_record_is_skipped_but_stays_inside_the_range():
    good = [accepted(d, i) for i, d in enumerate(documents(3))]
    bad = Record(3, b"\xff not a document", [], 0)
    rows = rows_of(0, 0, [*good, bad, accepted(documents(1, start=9)[0], 5)])
    assert (len(rows), rows.skipped, rows.records, rows.end) == (4, 1, 5, 6)
    assert rows.columns["kafka_offset"] == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        rows.add([accepted(documents(1)[0], 5)])  # offsets only move forward


def test_an_empty_range_still_makes_a_readable_shard():
    rows = rows_of(0, 0, [Record(0, b"", [], 0)])
    assert (len(rows), rows.end) == (0, 1)
    assert count_rows(encode_parquet(rows, 3), "parquet") == 0
    assert count_rows(encode_jsonl_zst(rows, 3), "jsonl") == 0


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_scan_resumes_each_partition_after_its_highest_complete_shard(tmp_path, fmt):
    store = ShardStore(str(tmp_path / "shards"))
    encode = encode_parquet if fmt == "parquet" else encode_jsonl_zst
    docs = documents(40)

    def publish(partition: int, start: int, end: int) -> ShardName:
        rows = rows_of(partition, start, [accepted(d, start + i) for i, d in enumerate(docs[: end - start])])
        name = rows.shard_name(fmt)
        store.publish(name.name, encode(rows, 3))
        return name

    publish(0, 0, 10)
    publish(0, 10, 25)
    publish(1, 0, 5)
    publish(2, 0, 7)
    # what a sink killed mid-write leaves: a temporary file, and (on a filesystem without atomic
    # writes) a torn newest shard
    torn = ShardName(TOPIC, 1, 5, 9, fmt).name
    complete = encode(rows_of(1, 5, [accepted(d, 5 + i) for i, d in enumerate(docs[:4])]), 3)
    (tmp_path / "shards" / torn).write_bytes(complete[: len(complete) // 2])
    leftover = f".tmp-{ShardName(TOPIC, 2, 7, 30, fmt).name}.1a2b3c"
    (tmp_path / "shards" / leftover).write_bytes(b"partial")
    manifest_leftover = f".tmp-_SUCCESS-{TOPIC}.{fmt}.json.4d5e6f"
    (tmp_path / "shards" / manifest_leftover).write_bytes(b"{")
    # other topics' and formats' files are not this checkpoint's
    other_fmt = "jsonl" if fmt == "parquet" else "parquet"
    (tmp_path / "shards" / ShardName(TOPIC, 0, 25, 99, other_fmt).name).write_bytes(b"x")
    (tmp_path / "shards" / ShardName(TOPIC + ".v2", 0, 0, 500, fmt).name).write_bytes(b"x")
    (tmp_path / "shards" / f".tmp-{TOPIC}.v2-p00000-x").write_bytes(b"x")

    scan = store.scan(TOPIC, fmt)
    assert scan.resume == {0: 25, 1: 5, 2: 7}
    assert sorted(scan.removed) == sorted([leftover, manifest_leftover, torn])
    left = {p.name for p in (tmp_path / "shards").iterdir()}
    assert leftover not in left and torn not in left
    assert f".tmp-{TOPIC}.v2-p00000-x" in left  # another topic's sink may be writing it
    assert [(s.start, s.end) for s in scan.shards[0]] == [(0, 10), (10, 25)]

    manifest = build_manifest(store, TOPIC, fmt, {0: 27, 1: 5, 2: 7})
    assert manifest["rows"] == 10 + 15 + 5 + 7
    assert manifest["partitions"]["0"] == {"start": 0, "end": 27, "shards": 2}
    first = manifest["shards"][0]
    data = (tmp_path / "shards" / first["name"]).read_bytes()
    assert first["sha256"] == hashlib.sha256(data).hexdigest() and first["bytes"] == len(data)
    name = write_manifest(store, manifest)
    assert json.loads((tmp_path / "shards" / name).read_text())["rows"] == 37
    assert ShardName.parse(name) is None and store.scan(TOPIC, fmt).resume == scan.resume

    (tmp_path / "shards" / scan.shards[0][0].name).unlink()  # a hole
    publish(0, 0, 9)
    with pytest.raises(ValueError, match="does not start where"):
        build_manifest(store, TOPIC, fmt, {0: 27, 1: 5, 2: 7})


def test_any_fsspec_filesystem_works_memory_for_one():
    store = ShardStore("memory://sf-test-shards")
    rows = rows_of(0, 0, [accepted(d, i) for i, d in enumerate(documents(3))])
    store.publish(rows.shard_name("parquet").name, encode_parquet(rows, 1))
    assert store.scan(TOPIC, "parquet").resume == {0: 3}
    store.fs.rm(store.root, recursive=True)


@pytest.mark.parametrize("setting, value", [
    ("sink.format", "csv"), ("sink.shard_max_docs", "0"), ("sink.shard_max_bytes", "0"),
    ("sink.roll_interval_s", "0"), ("sink.compression_level", "23"), ("sink.path", " "),
])
def test_sink_settings_are_validated_naming_the_field(setting, value):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        load_config(env={}, overrides=[f"{setting}={value}"])


def test_sink_settings_come_from_the_environment_too():
    config = load_config(env={"STREAMFILTER_SINK_SHARD_MAX_DOCS": "500", "STREAMFILTER_SINK_FORMAT": "jsonl"})
    assert (config.sink.shard_max_docs, config.sink.format, config.sink.path) == (500, "jsonl", ".cache/shards")
