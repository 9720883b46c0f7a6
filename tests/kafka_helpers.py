"""Helpers the Kafka tests share: a test's config file, producing, reading committed output, waiting.

Plain functions and classes (fixtures are in conftest.py): `tests/daemon` and `tests/replay`
both import them from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

TOPIC_KINDS = ("raw", "scored", "accepted", "rejected", "dlq")
MAX_RECORD_BYTES = 16 * 1_048_576  # scored records carry their embeddings; the DLQ keeps oversized originals


def to_toml(data: dict) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def stream_config(bootstrap: str, group_prefix: str, topics: dict, partitions: int) -> dict:
    """The sections every test's config shares: its broker and topics, quick group timeouts, the
    askllm+density policy at 0.3, and a route that needs only one snapshot of a few documents."""
    return {
        "kafka": {"bootstrap_servers": bootstrap, "instance_id": "test", "group_prefix": group_prefix,
                  "session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "transaction_timeout_ms": 10000},
        "topics": {**topics, "partitions": partitions},
        "policy": {"name": "askllm+density", "keep_rate": 0.3, "quality_keep": 0.6},
        "route": {"snapshot_poll_s": 1.0, "min_snapshot_docs": 1},  # streams of a few hundred documents
        "daemon": {"shutdown_timeout_s": 20},
    }


def write_config(path: Path, base: dict, sections: dict) -> Path:
    """Write `base` with each of `sections` merged into its section, as TOML, to `path`."""
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    path.write_text(to_toml(merged))
    return path


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None] | None = None,
            headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_request_size=MAX_RECORD_BYTES)
    for i, value in enumerate(values):
        producer.send(topic, value=value, key=keys[i] if keys else None, headers=headers)
    producer.flush()
    producer.close()


def read_committed(bootstrap: str, topic: str, expected: int | None = None, timeout_s: float = 30) -> list:
    """All committed records of `topic` (waits until `expected` arrived or nothing new came for a while)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, isolation_level="read_committed",
                             max_partition_fetch_bytes=MAX_RECORD_BYTES)
    records, deadline, quiet_since = [], time.monotonic() + timeout_s, time.monotonic()
    while time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=500)
        got = [r for part in polled.values() for r in part]
        records.extend(got)
        if got:
            quiet_since = time.monotonic()
        if expected is not None and len(records) >= expected and time.monotonic() - quiet_since > 1.0:
            break
        if expected is None and time.monotonic() - quiet_since > 3.0:
            break
    consumer.close()
    return records


class OutputCollector:
    """A read_committed reader of the output topics that accumulates records across polls."""

    def __init__(self, bootstrap: str, topics: list[str]):
        self.consumer = KafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None,
                                      auto_offset_reset="earliest", enable_auto_commit=False,
                                      isolation_level="read_committed", max_partition_fetch_bytes=MAX_RECORD_BYTES)
        self.records: dict[str, list] = {t: [] for t in topics}

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.records.values())

    def poll(self, timeout_ms: int = 500) -> int:
        for tp, part in self.consumer.poll(timeout_ms=timeout_ms).items():
            self.records[tp.topic].extend(part)
        return self.total

    def wait_total(self, n: int, timeout_s: float, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout_s
        while self.poll() < n and time.monotonic() < deadline:
            assert alive(), "the daemon exited"
        # a little longer: anything beyond n would be a duplicate
        end = time.monotonic() + 2
        while time.monotonic() < end:
            self.poll(200)

    def close(self) -> None:
        self.consumer.close()


def wait_for(predicate, timeout_s: float, interval_s: float = 1.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {message}")
