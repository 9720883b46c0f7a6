"""Kafka clients for every stage, written once: construction, timeouts, size limits, health.

Score, route and replay run in `kafka_loop.TransactionalLoop`; the sketch aggregator has its
own loop (its snapshot is its checkpoint). Both build their clients here and watch them with
`ConsumerWatch`, so broker health, lag, stall detection and backoff mean the same in every stage.

**Timeouts that fit together.** A transaction must end before the broker times it out
(`kafka.transaction_timeout_ms`), so a record's delivery timeout is at most two thirds of it
and each request's at most a third; `send_offsets_to_transaction` and
`commit/abort_transaction` wait a third of it, at least 5 s and never longer than it
(`txn_wait_ms`: kafka-python's own calls wait without a limit, and a wait that outlasts the
broker's outage delays recovery by what is left of it). Reconnects back off at most 1 s
(`Config.kafka_client_settings`). A commit that times out is treated as failed: the producer is
replaced, and the new one's `init_transactions` waits until the broker has finished the old
transaction (committed or aborted), so the rewind that follows reads settled offsets.

**Size limits that agree** (`SizeLimits`): one output record (value + key + headers) may be
`output_record_bytes` (an output larger than that is quarantined as `output_too_large`); the
producer's `max_request_size` and the `max.message.bytes` of the topics streamfilter creates
leave room above that. A DLQ entry copies at most `records.max_doc_bytes` of the original
value: every value the daemon accepts as a document fits whole, and a larger one (`too_large`)
is cut there, its size and sha256 in headers. `check_topic_limits` makes sure at start-up that
each output topic holds `records.max_doc_bytes` plus the headroom, so no DLQ entry and no
record of an accepted document can be refused by the broker.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamfilter import metrics
from streamfilter.config import Config
from streamfilter.errors import UserError

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
# Room for everything around the document in one output record: the embedding (768 float16 =
# 1.5 KiB), model ids, source coordinates, msgpack framing and headers (DLQ detail <= 1000 bytes).
RECORD_HEADROOM_BYTES = 16 * KIB
# A record batch's own framing on top of its records (the broker's max.message.bytes counts it).
BATCH_OVERHEAD_BYTES = 1 * KIB


@dataclass(frozen=True)
class SizeLimits:
    """Byte limits derived from `records.max_doc_bytes`; see the module docstring."""

    max_doc_bytes: int  # larger raw values are too_large
    output_record_bytes: int  # one output record: value + key + headers
    producer_request_bytes: int  # the producer's max_request_size
    topic_message_bytes: int  # max.message.bytes of the topics streamfilter creates
    dlq_value_bytes: int  # the most of an original value a DLQ entry copies

    @classmethod
    def of(cls, config: Config) -> "SizeLimits":
        max_doc = config.records.max_doc_bytes
        output = max(4 * MIB, 2 * max_doc + RECORD_HEADROOM_BYTES)
        request = output + BATCH_OVERHEAD_BYTES
        return cls(max_doc_bytes=max_doc, output_record_bytes=output, producer_request_bytes=request,
                   topic_message_bytes=request, dlq_value_bytes=max_doc)


def record_size(value: bytes, key: bytes | None, headers) -> int:
    return len(value) + (len(key) if key else 0) + sum(len(k) + len(v) for k, v in headers)


# -- client construction -----------------------------------------------------------------


def new_consumer(config: Config, group: str | None, **overrides):
    from kafka import KafkaConsumer

    finish_joins_done_between_polls()
    settings = dict(
        group_id=group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=config.kafka.max_poll_records,
        fetch_max_bytes=config.kafka.fetch_max_bytes,
        max_partition_fetch_bytes=max(config.records.max_doc_bytes * 2, MIB),
        session_timeout_ms=config.kafka.session_timeout_ms,
        heartbeat_interval_ms=config.kafka.heartbeat_interval_ms,
        # kafka-python's default (305 s) would hold the consumer thread through a broker outage.
        request_timeout_ms=max(config.kafka.session_timeout_ms + 5_000, 15_000),
        **config.kafka_client_settings(),
    )
    settings.update(overrides)
    return KafkaConsumer(**settings)


def finish_joins_done_between_polls() -> None:
    """Make kafka-python's group join finish when it completed after the poll that started it.

    kafka-python 3.0.12 runs JoinGroup and SyncGroup as a background task and finishes the join
    (assignment, rebalance listener, heartbeats back on) only in a poll that waits for the task.
    A poll that gives up first leaves the task to complete alone; the next poll then either
    replaces the completed task with a new JoinGroup (one more rebalance) or, when the rebalance was
    the leader's own after its topic's partitions changed, skips the join altogether, because the
    new assignment already matches the metadata and `need_rejoin()` says False: the member keeps no
    partitions and sends no heartbeats until the stage's stall watch replaces it (12 s at best).
    Every leader starts with such a rebalance, and adding partitions makes another. So, as the Java
    client does with its join future, a join task in flight or done counts as a rejoin needed, and
    one found done is finished first (a failed one is tried again). Idempotent; the internals it
    uses are checked in tests/test_kafka_clients.py and the fault it fixes is reproduced in
    tests/daemon/test_group_rejoin.py."""
    from kafka.coordinator.base import BaseCoordinator
    from kafka.structs import MemberState

    original = BaseCoordinator.join_group_async
    if getattr(original, "finishes_done_joins", False):
        return
    needs_join = BaseCoordinator.need_rejoin

    def need_rejoin(self):
        # a join in flight or done and not finished yet: the consumer's poll must go on with it
        return needs_join(self) or self._join_task is not None

    async def join_group_async(self, timeout_ms=None):
        task = self._join_task
        if task is not None and task.is_done:
            self._join_task = None
            if task.succeeded():  # what kafka-python does when it sees the task complete itself
                with self._lock:
                    self.rejoining = False
                    self.rejoin_needed = False
                    self.state = MemberState.STABLE
                    self._enable_heartbeat()
                gen = self._generation
                await self._on_join_complete_async(gen.generation_id, gen.member_id, gen.protocol, task.value)
                return True
            self.request_rejoin()  # a failed attempt: the join loop makes a new one
        return await original(self, timeout_ms)

    join_group_async.finishes_done_joins = True
    BaseCoordinator.need_rejoin = need_rejoin
    BaseCoordinator.join_group_async = join_group_async


def close_quietly(consumer) -> None:
    """Close a consumer that is being replaced (after a broker fault); its own errors do not matter."""
    if consumer is None:
        return
    try:
        consumer.close()
    except Exception:  # noqa: BLE001 - the old consumer is discarded either way
        pass


def producer_timeouts(config: Config) -> dict[str, int]:
    """Client timeouts that end inside one transaction (see the module docstring)."""
    txn = config.kafka.transaction_timeout_ms
    request = max(1_000, min(30_000, txn // 3))
    delivery = max(request + 1_000, txn * 2 // 3)
    return {"request_timeout_ms": request, "delivery_timeout_ms": delivery, "max_block_ms": max(5_000, txn // 2)}


def txn_wait_ms(config: Config) -> int:
    """How long a transaction's offset commit or end may take before it counts as failed."""
    txn = config.kafka.transaction_timeout_ms
    return min(txn, max(5_000, txn // 3))


def new_transactional_producer(config: Config, transactional_id: str):
    from kafka import KafkaProducer

    limits = SizeLimits.of(config)
    producer = KafkaProducer(
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        batch_size=min(config.kafka.producer_batch_bytes, limits.producer_request_bytes),
        max_request_size=limits.producer_request_bytes,
        transaction_timeout_ms=config.kafka.transaction_timeout_ms,
        **producer_timeouts(config),
        **config.kafka_client_settings(),
    )
    try:
        producer.init_transactions()
    except BaseException:
        producer.close(timeout=0)
        raise
    return producer


def end_transaction(producer, commit: bool, timeout_ms: int) -> None:
    """commit_transaction / abort_transaction with a bounded wait (kafka-python's wait forever)."""
    _wait(producer, producer._transaction_manager.begin_commit() if commit
          else producer._transaction_manager.begin_abort(), timeout_ms, "commit" if commit else "abort")


def send_offsets(producer, offsets: dict, group_metadata, timeout_ms: int) -> None:
    """send_offsets_to_transaction with a bounded wait."""
    _wait(producer, producer._transaction_manager.send_offsets_to_transaction(offsets, group_metadata),
          timeout_ms, "send_offsets_to_transaction")


def pending_offsets(producer) -> dict:
    """Offsets the client still holds from an earlier TxnOffsetCommit (kafka-python keeps those of
    a failed one, and sends them with the next transaction's): must be empty before a transaction."""
    manager = getattr(producer, "_transaction_manager", None)
    return dict(getattr(manager, "_pending_txn_offset_commits", {}) or {})


def _wait(producer, result, timeout_ms: int, what: str) -> None:
    from kafka.errors import KafkaTimeoutError

    producer._sender.wakeup()
    if not result.wait(timeout_ms=timeout_ms):
        raise KafkaTimeoutError(f"{what} did not finish within {timeout_ms} ms")


# -- failures --------------------------------------------------------------------------------


def is_record_failure(exc: BaseException) -> bool:
    """True when a transaction failed because of what it carried (a record the producer or the
    broker refuses), not because of the broker: retrying the same records would fail again."""
    from kafka import errors

    record_errors = (errors.MessageSizeTooLargeError, errors.RecordListTooLargeError, errors.InvalidRecordError,
                     errors.CorruptRecordError)
    return isinstance(exc, record_errors) or (not isinstance(exc, errors.KafkaError)
                                               and isinstance(exc, (TypeError, ValueError, AssertionError)))


class Backoff:
    """Exponential backoff with jitter (half fixed, half random), so restarted stages do not retry in step."""

    def __init__(self, max_s: float, first_s: float = 0.2, rng: random.Random | None = None):
        self.max_s, self.first_s, self.current = max_s, first_s, first_s
        self.rng = rng or random.Random()

    def next(self) -> float:
        delay = self.current
        self.current = min(self.max_s, self.current * 2)
        return delay / 2 + self.rng.uniform(0, delay / 2)

    def reset(self) -> None:
        self.current = self.first_s


# -- health ----------------------------------------------------------------------------------


class StageHealth:
    """What one stage reports: `streamfilter_broker_up` from real requests, readiness with a reason."""

    def __init__(self, stage: str):
        self.stage = stage
        self.reason = "starting"
        metrics.READINESS.register(stage)

    def broker_ok(self) -> None:
        metrics.BROKER_UP.labels(self.stage).set(1)

    def broker_failed(self, reason: str) -> None:
        metrics.BROKER_UP.labels(self.stage).set(0)
        self.not_ready(reason)

    def progressing(self) -> None:
        if self.reason:
            self.reason = ""
            metrics.READINESS.set(self.stage, True)

    def not_ready(self, reason: str) -> None:
        if reason != self.reason:
            self.reason = reason
            metrics.READINESS.set(self.stage, False, reason)


STALL_S = 10.0  # records readable but none returned this long: the consumer is recreated
PROBE_INTERVAL_S = 2.0


class ConsumerWatch:
    """Asks the broker for the end offsets of a consumer's partitions every `PROBE_INTERVAL_S`:
    that request is the broker-health probe (`broker_up`), gives the lag (end − position), and
    finds a stall — records readable (a read_committed consumer's end offsets are the last stable
    offsets, so an upstream transaction still open does not count) while polls return none for
    `STALL_S`. Seen here: kafka-python consumers that stop fetching after a broker restart or,
    assigned while their partitions were empty, never fetch what is committed later."""

    def __init__(self, health: StageHealth, stall_s: float = STALL_S, probe_interval_s: float = PROBE_INTERVAL_S):
        self.health = health
        self.stall_s = stall_s
        self.probe_interval_s = probe_interval_s
        self._probed_at = 0.0
        self._records_at = time.monotonic()

    def got_records(self, records: Sequence = ()) -> None:
        """Records were polled. With `records` (kafka ConsumerRecords), the lag in seconds of each of
        their partitions is set: the age of the oldest record just taken, the oldest one unprocessed."""
        self._records_at = time.monotonic()
        oldest: dict[tuple[str, int], int] = {}
        for r in records:
            if r.timestamp is not None and r.timestamp >= 0:
                key = (r.topic, r.partition)
                oldest[key] = min(oldest.get(key, r.timestamp), r.timestamp)
        now_ms = time.time() * 1000
        for (topic, partition), ts in oldest.items():
            metrics.CONSUMER_LAG_SECONDS.labels(self.health.stage, topic, str(partition)).set(
                max(0.0, (now_ms - ts) / 1000))

    def reset(self) -> None:
        self._records_at = time.monotonic()
        self._probed_at = 0.0

    def probe(self, consumer, skip: Any = ()) -> bool:
        """Probe when due; True when the consumer is stalled and should be recreated. `skip`: partitions
        not to count as stalled (paused ones at the end of a bounded range)."""
        now = time.monotonic()
        if now - self._probed_at < self.probe_interval_s:
            return False
        self._probed_at = now
        stage = self.health.stage
        assigned = list(consumer.assignment())
        if not assigned:
            return False
        try:
            ends = consumer.end_offsets(assigned, timeout_ms=3_000)
            positions = {tp: consumer.position(tp, timeout_ms=1_000) for tp in assigned}
        except Exception as exc:  # noqa: BLE001 - the broker is away: say so, the loops retry
            self.health.broker_failed(f"broker unreachable: {type(exc).__name__}: {exc}")
            return False
        self.health.broker_ok()
        behind = {}
        for tp, end in ends.items():
            position = positions.get(tp)
            if position is None or end is None:
                continue
            # Lag from the high watermark, not the stable end: records held back by an open upstream
            # transaction are lag an operator must see (the no-progress alert reads it).
            high = consumer.highwater(tp)
            lag = max(0, (end if high is None else max(high, end)) - position)
            metrics.CONSUMER_LAG.labels(stage, tp.topic, str(tp.partition)).set(lag)
            if lag == 0:  # caught up: nothing waits (the age of the last records taken is not lag)
                metrics.CONSUMER_LAG_SECONDS.labels(stage, tp.topic, str(tp.partition)).set(0)
            if position < end and tp not in skip:
                behind[tp] = (position, end)
        if not behind:
            self._records_at = now  # nothing to read is not a stall
            self.health.progressing()
            return False
        idle_s = now - self._records_at
        if idle_s < self.stall_s:
            return False
        where = ", ".join(f"{tp.topic}[{tp.partition}] at {p} of {e}" for tp, (p, e) in sorted(behind.items()))
        log.warning("%s: no records for %.0fs although %s; recreating the consumer", stage, idle_s, where)
        self.health.not_ready(f"stalled: {where} for {idle_s:.0f}s")
        metrics.BATCH_RETRIES.labels(stage, "stall").inc()
        self._records_at = now
        return True


def forget_lag(stage: str, partitions) -> None:
    for tp in partitions:
        for gauge in (metrics.CONSUMER_LAG, metrics.CONSUMER_LAG_SECONDS):
            try:
                gauge.remove(stage, tp.topic, str(tp.partition))
            except KeyError:
                pass


# -- start-up checks ---------------------------------------------------------------------------


def topic_message_bytes(admin, topics: list[str]) -> dict[str, int]:
    """{topic: max.message.bytes} as the broker applies it (its default where the topic sets none)."""
    from kafka.admin import ConfigResource, ConfigResourceType

    found: dict[str, int] = {}
    described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None})
                                        for t in topics], config_filter="all")
    for name, entries in (described.get("topic") or {}).items():  # kafka-python 3: {"topic": {name: {key: {...}}}}
        value = (entries.get("max.message.bytes") or {}).get("value")
        if value is not None:
            found[name] = int(value)
    return found


def check_topic_limits(config: Config, admin, outputs: dict[str, str]) -> None:
    """Fail start-up with one line when an output topic cannot hold what the daemon writes to it.

    `outputs` maps the setting that names a topic (`topics.dlq`, ...) to the topic.
    """
    limits = SizeLimits.of(config)
    names = [t for t in dict.fromkeys(outputs.values()) if t]
    have = topic_message_bytes(admin, names)
    for setting, topic in outputs.items():
        if not topic or topic not in have:
            continue
        needed = limits.max_doc_bytes + RECORD_HEADROOM_BYTES + BATCH_OVERHEAD_BYTES
        if have[topic] < needed:
            raise UserError(
                f"{setting} {topic!r}: max.message.bytes is {have[topic]}, too small for records.max_doc_bytes "
                f"{limits.max_doc_bytes} (documents and their DLQ copies need up to {needed} bytes); raise the "
                f"topic's max.message.bytes (kafka-configs.sh --alter --add-config max.message.bytes="
                f"{limits.topic_message_bytes}) or lower records.max_doc_bytes")
