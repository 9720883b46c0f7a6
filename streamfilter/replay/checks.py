"""What a replay, a dry-run or a comparison checks before it reads a range or writes anything.

Each check fails with one line (UserError or ConfigError) naming the argument at fault:
the input topic exists and holds scored records, the snapshot fits the configuration and
the input, the policy can decide with it, and the outputs hold no other writer's records.
"""

from __future__ import annotations

import time
from pathlib import Path

from streamfilter.config import Config
from streamfilter.errors import ConfigError, UserError

SCORED_PROBE_RECORDS = 20  # per partition: how far into the range a route replay looks for scored records
OUTPUT_PROBE_RECORDS = 50  # per partition: the newest records of an output whose writers are looked at
LIVE_JOB = "live"  # the `sf-job` header of the live route's records


def check_topic(consumer, topic: str, what: str) -> None:
    if topic not in consumer.topics():
        raise UserError(f"{what} topic {topic!r} does not exist")


def first_embedding_dim(consumer, topic: str, ranges: dict[int, tuple[int, int]]) -> int | None:
    """The embedding dimension of the first decodable scored record in the range (None if there is none).

    Raises `UserError` when the range has records but none of the first ones (up to
    `SCORED_PROBE_RECORDS` per partition) is a scored record: a route replay of a raw or an
    output topic would send every record to the DLQ. Leaves `consumer` assigned to the range's
    last partition."""
    from kafka.structs import TopicPartition

    from streamfilter.errors import InvalidDocument
    from streamfilter.records import decode_scored

    examined, reason = 0, ""
    for partition, (start, end) in sorted(ranges.items()):
        if start >= end:
            continue
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline, seen = time.monotonic() + 10, 0
        while time.monotonic() < deadline and seen < SCORED_PROBE_RECORDS:
            records = consumer.poll(timeout_ms=500, max_records=SCORED_PROBE_RECORDS - seen).get(tp, [])
            for record in records:
                if record.offset >= end:
                    break
                seen += 1
                try:
                    return int(decode_scored(record.value).embedding.shape[0])
                except InvalidDocument as exc:
                    reason = reason or exc.detail
            examined += len(records)
            if not records and consumer.position(tp) >= end:
                break
    if examined:
        raise UserError(f"{topic} does not hold scored records: none of the first {examined} records of the range "
                        f"is one ({reason}); --mode route replays a scored topic (topics.scored), --mode rescore a "
                        "raw one")
    return None


def load_snapshot(config: Config, ref: str, dim: int | None, required: bool):
    """The snapshot `ref` names (file, snapshot id or latest), checked against the configured sketch and the
    input's embedding dimension `dim`. Not `required` (a policy that decides without one): None when
    `latest` finds none, and unchecked."""
    from streamfilter.density.snapshot_inspect import config_mismatch
    from streamfilter.density.snapshot_store import SnapshotStore

    store = SnapshotStore(config.sketch.snapshot_dir)
    if not required:
        try:
            return store.find(ref)[1]
        except UserError:
            if ref != "latest":
                raise
            return None
    path, snapshot = store.find(ref)
    label = ref if Path(ref) == path else f"{ref} ({path.name})"
    mismatch = config_mismatch(snapshot, config)
    if mismatch:
        raise ConfigError(f"--snapshot {label}: other sketch parameters ({mismatch})")
    if dim is not None and snapshot.sketch.dim != dim:
        raise ConfigError(f"--snapshot {label}: it sketches {snapshot.sketch.dim}-dimensional embeddings; "
                          f"the input's are {dim}-dimensional")
    return snapshot


def fixed_route(config: Config, snapshot, job: str = LIVE_JOB, **topics):
    """A `RouteTransform` that decides every record with `snapshot` (stage "replay"; `topics`: its
    accepted_topic, rejected_topic and dlq_topic); UserError when the policy cannot decide with it."""
    from streamfilter.policies import PolicyNotReady
    from streamfilter.stages import RouteTransform

    try:
        return RouteTransform.from_config(config, fixed=True, snapshot=snapshot, stage="replay", job=job, **topics)
    except PolicyNotReady as exc:
        raise UserError(f"--snapshot: {exc}") from None


def check_outputs_unused(config: Config, topics: list[str], job_id: str) -> None:
    """Refuse to write into an output topic that already holds records of another job or of the live
    route (their `sf-job` header, read from the newest records of each partition): `--append` skips this."""
    from kafka.structs import TopicPartition

    from streamfilter.kafka_clients import new_consumer

    consumer = new_consumer(config, None, allow_auto_create_topics=False)
    try:
        existing = consumer.topics()
        for topic in filter(None, topics):
            if topic not in existing:
                continue
            others = _other_writers(consumer, [TopicPartition(topic, p) for p in
                                               sorted(consumer.partitions_for_topic(topic) or ())], job_id)
            if others:
                what = ", ".join(f"{'the live route' if j == LIVE_JOB else f'job {j!r}'} ({n} of its newest records)"
                                 for j, n in sorted(others.items()))
                raise UserError(f"--output/--rejected-output: {topic} already holds records from {what}; "
                                "replay into a new topic, or pass --append to add to it")
    finally:
        consumer.close(autocommit=False)


def _other_writers(consumer, tps: list, job_id: str) -> dict[str, int]:
    """{writer: records} among the newest records of `tps` that another writer than `job_id` wrote."""
    unknown = "an unknown writer (no sf-job header)"
    consumer.assign(tps)
    ends = consumer.end_offsets(tps)
    begins = consumer.beginning_offsets(tps)
    for tp in tps:
        if ends[tp] > begins[tp]:
            consumer.seek(tp, max(begins[tp], ends[tp] - OUTPUT_PROBE_RECORDS))  # the newest records (and markers)
    others: dict[str, int] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in tps):
        for part in consumer.poll(timeout_ms=300).values():
            for record in part:
                job = dict(record.headers or ()).get("sf-job", b"").decode("utf-8", "replace")
                if job != job_id:
                    others[job or unknown] = others.get(job or unknown, 0) + 1
    return others
