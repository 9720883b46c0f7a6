"""A replay job: its Kafka identity and its description, kept in its own committed offsets.

A job id names a consumer group `<group_prefix>.replay.<job id>` and a transactional id of
the same name. When a job starts, its fixed range, time window, snapshot id and a digest
of its arguments are committed as the metadata of each partition's starting offset; every
transaction then commits the offsets it consumed with the same metadata. So the group's
committed offsets say, atomically with the output, both what the job is and how far it
got: a restart (after a kill, on any machine) resumes the same range with the same
snapshot, and a restart with other arguments under the same job id is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from streamfilter.config import Config
from streamfilter.errors import ConfigError
from streamfilter.replay.ranges import TimeWindow

METADATA_KEY = "sf-replay"
METADATA_VERSION = 1


def spec_digest(fields: dict) -> str:
    """A short stable digest of a job's arguments (anything JSON-serialisable)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_job_id(digest: str) -> str:
    return f"replay-{digest[:12]}"


def group_of(config: Config, job_id: str) -> str:
    return f"{config.kafka.group_prefix}.replay.{job_id}"


@dataclass
class JobState:
    """The fixed description of a job and its committed progress."""

    spec: str  # digest of the arguments
    ranges: dict[int, tuple[int, int]]  # partition -> (first offset, end offset), fixed at the start
    window: TimeWindow
    snapshot_id: str  # "" when the job decides without a snapshot (random policy, rescore)
    committed: dict[int, int]  # partition -> next offset to read

    @property
    def total(self) -> int:
        return sum(end - start for start, end in self.ranges.values())

    @property
    def done(self) -> int:
        return sum(min(self.committed.get(p, s), e) - s for p, (s, e) in self.ranges.items())

    @property
    def complete(self) -> bool:
        return all(self.committed.get(p, s) >= e for p, (s, e) in self.ranges.items())

    def metadata(self, partition: int) -> str:
        start, end = self.ranges[partition]
        return json.dumps({METADATA_KEY: METADATA_VERSION, "spec": self.spec, "start": start, "end": end,
                           "from_ms": self.window.from_ms, "to_ms": self.window.to_ms,
                           "snapshot": self.snapshot_id}, separators=(",", ":"))


def load(consumer, topic: str) -> JobState | None:
    """The job recorded in the consumer's group for `topic`, or None when the group never started one."""
    from kafka.structs import TopicPartition

    partitions = sorted(consumer.partitions_for_topic(topic) or ())
    found: dict[int, dict] = {}
    committed: dict[int, int] = {}
    for p in partitions:
        entry = consumer.committed(TopicPartition(topic, p), metadata=True)
        if entry is None:
            continue
        try:
            meta = json.loads(entry.metadata or "null")
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get(METADATA_KEY) != METADATA_VERSION:
            raise ConfigError(f"consumer group {consumer.config['group_id']!r} holds offsets that no replay job "
                              "wrote; choose another --job-id")
        found[p] = meta
        committed[p] = entry.offset
    if not found:
        return None
    first = next(iter(found.values()))
    return JobState(
        spec=first["spec"], ranges={p: (m["start"], m["end"]) for p, m in found.items()},
        window=TimeWindow(first.get("from_ms"), first.get("to_ms")), snapshot_id=first.get("snapshot", ""),
        committed=committed)


def record_start(consumer, topic: str, state: JobState) -> None:
    """Commit each partition's first offset with the job's description (before anything is produced)."""
    from kafka.structs import OffsetAndMetadata, TopicPartition

    consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(start, state.metadata(p), -1)
                     for p, (start, _) in state.ranges.items()})


def record_end(consumer, topic: str, state: JobState) -> None:
    """Commit each partition's end once the job is complete: the last records' offsets stop short of it
    when the range ends in transaction markers, and a rerun should see the job as complete."""
    from kafka.structs import OffsetAndMetadata, TopicPartition

    consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(end, state.metadata(p), -1)
                     for p, (_, end) in state.ranges.items()})
    state.committed = {p: end for p, (_, end) in state.ranges.items()}
