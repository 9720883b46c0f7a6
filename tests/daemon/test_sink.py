"""`streamfilter sink` against the real broker: shards readable by pyarrow and by `zstd -d | jq`, every
accepted id exactly once across shards after repeated SIGKILLs, and the one-shot `--until-end` range."""

from __future__ import annotations

import collections
import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from kafka_helpers import to_toml, wait_for
from streamfilter.broker import free_port
from streamfilter.records import Document, ScoredRecord, encode_document
from streamfilter.shards import ShardName
from streamfilter.stages.route import decision_headers


pytestmark = pytest.mark.kafka


class AcceptedProducer:
    """Writes records to an accepted topic as the route does: msgpack documents, `sf-*` headers, in
    transactions; every `abort_every`-th transaction is aborted (its records must appear nowhere)."""

    def __init__(self, bootstrap: str, topic: str, abort_every: int = 4):
        self.topic, self.abort_every = topic, abort_every
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"sink-test-{uuid.uuid4().hex}",
                                      enable_idempotence=True, linger_ms=5)
        self.producer.init_transactions()
        self.committed: list[str] = []
        self.transactions = 0
        self.next_id = 0

    def transaction(self, n: int, extra_values: list[bytes] = ()) -> None:
        self.producer.begin_transaction()
        ids = []
        for _ in range(n):
            doc_id = f"doc-{self.next_id}"
            self.next_id += 1
            doc = Document(id=doc_id, text=f"text of {doc_id} " * 5, url=f"https://example.org/{doc_id}", lang="en",
                           meta={"topic": "t", "n": self.next_id})
            decision = SimpleNamespace(keep=True, policy="askllm+density", snapshot_id="snap", askllm=0.9,
                                       density=0.1, probability=0.4)
            scored = ScoredRecord(doc, 0.9, np.zeros(4, np.float16), "a", "e", ("crawl.raw", 0, self.next_id))
            self.producer.send(self.topic, value=encode_document(doc), key=doc_id.encode(),
                               headers=decision_headers(decision, scored))
            ids.append(doc_id)
        for value in extra_values:
            self.producer.send(self.topic, value=value)
        self.transactions += 1
        if self.transactions % self.abort_every == 0:
            self.producer.abort_transaction()
        else:
            self.producer.commit_transaction()
            self.committed += ids

    def close(self) -> None:
        self.producer.close()


def make_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    admin.close()


def sink_config(tmp_path: Path, bootstrap: str, prefix: str, topic: str, out: Path, fmt: str, crash: float = 0.0,
                metrics_port: int = 0, **sink) -> Path:
    path = tmp_path / f"sink-{fmt}-{crash}-{metrics_port}.toml"
    path.write_text(to_toml({
        "kafka": {"bootstrap_servers": bootstrap, "instance_id": "test", "group_prefix": f"{prefix}.{fmt}",
                  "session_timeout_ms": 3000, "heartbeat_interval_ms": 500},
        "topics": {"accepted": topic, "partitions": 3},
        "batch": {"max_batch_docs": 200, "max_wait_ms": 100},
        "sink": {"path": str(out), "format": fmt, "shard_max_docs": 40, "roll_interval_s": 0.3, **sink},
        "daemon": {"metrics_port": metrics_port, "shutdown_timeout_s": 20, "crash_before_commit": crash},
    }))
    return path


def shards(out: Path, fmt: str) -> list[ShardName]:
    found = [ShardName.parse(p.name) for p in out.iterdir()] if out.exists() else []
    return sorted(s for s in found if s is not None and s.format == fmt)


def ids_in(out: Path, fmt: str) -> list[str]:
    """Every id in the shards, read as a user would: pyarrow for Parquet, `zstd -d | jq` for JSON lines."""
    files = [out / s.name for s in shards(out, fmt)]
    if not files:
        return []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        ids = []
        for f in files:
            ids += pq.read_table(f, columns=["id"]).column("id").to_pylist()
        return ids
    result = subprocess.run(["sh", "-c", 'zstd -dc -- "$@" | jq -r .id', "sh", *map(str, files)],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


def assert_tiled(out: Path, fmt: str) -> None:
    """Each partition's shards start at 0 and each starts where the one before ended."""
    by_partition = collections.defaultdict(list)
    for s in shards(out, fmt):
        by_partition[s.partition].append(s)
    for partition, parts in by_partition.items():
        parts.sort(key=lambda s: s.start)
        assert parts[0].start == 0, parts[0]
        for before, after in zip(parts, parts[1:]):
            assert after.start == before.end, (before.name, after.name)


def test_sigkilled_sinks_leave_every_accepted_id_exactly_once(tmp_path, bootstrap, names, start_daemon):
    topic = names.topic("accepted")
    make_topic(bootstrap, topic)
    producer = AcceptedProducer(bootstrap, topic)
    producer.transaction(300, extra_values=[b"\xff garbage from another producer"])
    producing = threading.Event()
    producing.set()

    def live() -> None:  # a live stream while the sinks are killed
        while producing.is_set():
            producer.transaction(60)
            time.sleep(0.05)

    feeder = threading.Thread(target=live, daemon=True)
    feeder.start()
    outs = {fmt: tmp_path / f"shards-{fmt}" for fmt in ("parquet", "jsonl")}
    configs = {fmt: sink_config(tmp_path, bootstrap, names.prefix, topic, out, fmt) for fmt, out in outs.items()}
    # daemon.crash_before_commit: the sink SIGKILLs itself between a shard's temporary file and its rename
    crashing = {fmt: sink_config(tmp_path, bootstrap, names.prefix, topic, out, fmt, crash=0.25)
                for fmt, out in outs.items()}
    rng = random.Random(15)
    kills = 0
    try:
        for round_ in range(4):
            seen = {fmt: len(shards(out, fmt)) for fmt, out in outs.items()}
            self_kill = round_ % 2 == 0
            sinks = {fmt: start_daemon((crashing if self_kill else configs)[fmt], "sink", f"sink-{fmt}-{round_}")
                     for fmt in outs}
            for fmt, sink in sinks.items():
                if self_kill:
                    wait_for(lambda: not sink.alive(), 60, 0.05, f"the {fmt} sink to kill itself")
                    assert sink.proc.returncode == -signal.SIGKILL, sink.log()[-3000:]
                    continue
                wait_for(lambda: len(shards(outs[fmt], fmt)) > seen[fmt] or not sink.alive(), 60, 0.05,
                         f"a new {fmt} shard")
                assert sink.alive(), sink.log()[-3000:]
            if not self_kill:
                time.sleep(rng.uniform(0.0, 0.6))  # mid-stream: shards are rolling every few hundred ms
                for sink in sinks.values():
                    sink.kill()
            kills += len(sinks)
    finally:
        producing.clear()
        feeder.join(30)
    producer.transaction(50)  # one more after the last kill
    producer.close()
    expected = sorted(producer.committed)
    final = {fmt: sink_config(tmp_path, bootstrap, names.prefix, topic, out, fmt, metrics_port=free_port())
             for fmt, out in outs.items()}
    sinks = {fmt: start_daemon(final[fmt], "sink", f"sink-{fmt}-final") for fmt in outs}
    for fmt, sink in sinks.items():
        sink.wait_ready("sink", timeout_s=60)  # /ready like every stage
        wait_for(lambda: len(set(ids_in(outs[fmt], fmt))) >= len(expected) or not sink.alive(), 90, 0.5,
                 f"every id in the {fmt} shards")
        assert sink.terminate() == 0, sink.log()[-3000:]
    assert kills == 8
    logs = "".join((tmp_path / f"sink-{fmt}-{r}.log").read_text() for fmt in outs for r in (1, 3))
    assert "left by an interrupted write" in logs  # the temporary files of the self-killed sinks were removed
    for fmt, out in outs.items():
        got = ids_in(out, fmt)
        duplicates = [i for i, n in collections.Counter(got).items() if n > 1]
        assert not duplicates, f"{fmt}: {len(duplicates)} duplicated ids, e.g. {duplicates[:5]}"
        assert sorted(got) == expected, f"{fmt}: missing {sorted(set(expected) - set(got))[:5]}"
        if fmt == "parquet":  # the folder as one dataset (pyarrow skips `_SUCCESS-*` and `.tmp-*` files)
            import pyarrow.parquet as pq

            assert sorted(pq.read_table(str(out), columns=["id"]).column("id").to_pylist()) == expected
        assert_tiled(out, fmt)
        assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # removed by the next start
        assert len(shards(out, fmt)) > 10


def run_once(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamfilter", "sink", "--config", str(config), "--until-end",
                           *extra], capture_output=True, text=True, timeout=120)


def test_until_end_writes_the_range_and_its_manifest_then_exits(tmp_path, bootstrap, names):
    topic = names.topic("accepted")
    make_topic(bootstrap, topic)
    producer = AcceptedProducer(bootstrap, topic, abort_every=3)
    for _ in range(6):
        producer.transaction(50, extra_values=[b"not msgpack \xff"] if _ == 0 else [])
    out = tmp_path / "export"
    # the format and folder from the command line override the file's
    config = sink_config(tmp_path, bootstrap, names.prefix, topic, tmp_path / "unused", "parquet",
                         roll_interval_s=300.0)
    result = run_once(config, "--format", "jsonl", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "unused").exists()
    manifest = json.loads((out / f"_SUCCESS-{topic}.jsonl.json").read_text())
    first = sorted(producer.committed)
    assert manifest["rows"] == len(first) == 200 and manifest["format"] == "jsonl"
    assert sorted(ids_in(out, "jsonl")) == first
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert sum(p["shards"] for p in manifest["partitions"].values()) == len(manifest["shards"]) == len(
        shards(out, "jsonl"))
    assert_tiled(out, "jsonl")
    import pyarrow as pa
    import pyarrow.json as pj

    table = pj.read_json(pa.input_stream(str(out / manifest["shards"][0]["name"]), compression="zstd"))
    assert {"id", "text", "decision", "askllm", "kafka_offset"} <= set(table.column_names)

    # nothing new: nothing written, still exits 0; then more records: the next range continues the tiling
    before = shards(out, "jsonl")
    result = run_once(config, "--format", "jsonl", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert shards(out, "jsonl") == before
    for _ in range(2):
        producer.transaction(40)
    producer.close()
    result = run_once(config, "--format", "jsonl", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / f"_SUCCESS-{topic}.jsonl.json").read_text())
    assert manifest["rows"] == len(producer.committed) and sorted(ids_in(out, "jsonl")) == sorted(producer.committed)
    assert_tiled(out, "jsonl")
