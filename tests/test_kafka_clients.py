"""The Kafka layer's pure parts: timeouts that fit together, size limits that agree, failure kinds, backoff."""

from __future__ import annotations

import random

import pytest
from kafka import errors

from streamfilter.config import load_config
from streamfilter.kafka_clients import (
    RECORD_HEADROOM_BYTES, Backoff, SizeLimits, is_record_failure, producer_timeouts, txn_wait_ms,
)


@pytest.mark.parametrize("txn_ms", [3_000, 10_000, 30_000, 60_000, 900_000])
def test_every_producer_wait_ends_inside_one_transaction(txn_ms):
    config = load_config(None, env={}, overrides=[f"kafka.transaction_timeout_ms={txn_ms}"])
    t = producer_timeouts(config)
    # kafka-python requires delivery >= request (+ linger); a record must expire before the broker
    # times its transaction out, or the commit waits on records the broker has already aborted.
    assert t["request_timeout_ms"] < t["delivery_timeout_ms"]
    assert t["delivery_timeout_ms"] <= txn_ms and txn_wait_ms(config) <= txn_ms


def test_a_transaction_timeout_the_timeouts_cannot_fit_in_is_refused():
    from streamfilter.errors import ConfigError

    with pytest.raises(ConfigError, match="kafka.transaction_timeout_ms"):
        load_config(None, env={}, overrides=["kafka.transaction_timeout_ms=1000"])


@pytest.mark.parametrize("max_doc", [64, 65_536, 1_000_000, 16 * 1_048_576])
def test_size_limits_agree(max_doc):
    limits = SizeLimits.of(load_config(None, env={}, overrides=[f"records.max_doc_bytes={max_doc}"]))
    # an accepted document plus everything a scored record or DLQ entry adds fits one output record,
    # which fits the producer's request, which fits the topics streamfilter creates
    assert limits.max_doc_bytes + RECORD_HEADROOM_BYTES <= limits.output_record_bytes
    assert limits.output_record_bytes < limits.producer_request_bytes <= limits.topic_message_bytes
    # every document the daemon accepts is copied to the DLQ whole; larger ones are cut there
    assert limits.dlq_value_bytes == max_doc


def test_record_failures_are_told_from_broker_failures():
    assert is_record_failure(errors.MessageSizeTooLargeError())
    assert is_record_failure(errors.InvalidRecordError())
    assert is_record_failure(TypeError("header value must be bytes"))
    for broker in (errors.KafkaTimeoutError(), errors.KafkaConnectionError(), errors.ProducerFencedError(),
                   errors.CommitFailedError(), errors.NotCoordinatorError(), errors.IllegalStateError()):
        assert not is_record_failure(broker), broker


def test_backoff_grows_to_its_cap_with_jitter():
    backoff = Backoff(max_s=5, first_s=0.2, rng=random.Random(1))
    delays = [backoff.next() for _ in range(12)]
    nominal = [min(5, 0.2 * 2 ** i) for i in range(12)]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal))
    assert len(set(round(d, 6) for d in delays[-5:])) == 5  # jittered, not in lock-step
    backoff.reset()
    assert backoff.next() <= 0.2


def test_the_kafka_python_internals_the_layer_relies_on_exist():
    """`pending_offsets`, `end_transaction` and `send_offsets` reach into kafka-python (pinned in
    pyproject.toml): an upgrade that renames these fails here, not silently in production."""
    from kafka.producer.kafka import KafkaProducer
    from kafka.producer.transaction_manager import TransactionalRequestResult, TransactionManager

    assert "_pending_txn_offset_commits" in TransactionManager.__init__.__code__.co_names
    for method in ("begin_commit", "begin_abort", "send_offsets_to_transaction"):
        assert callable(getattr(TransactionManager, method))
    assert "timeout_ms" in TransactionalRequestResult.wait.__code__.co_varnames
    assert {"_transaction_manager", "_sender"} <= set(KafkaProducer.__init__.__code__.co_names)


def test_the_kafka_python_group_join_internals_the_consumer_patch_relies_on_exist():
    """`finish_joins_done_between_polls` replaces two coordinator methods and repeats what kafka-python
    does when a join completes: an upgrade that changes these fails here (tests/daemon/test_group_rejoin.py
    shows the fault it fixes)."""
    import inspect

    from kafka.coordinator.base import BaseCoordinator
    from kafka.coordinator.consumer import ConsumerCoordinator
    from kafka.structs import MemberState

    from streamfilter.kafka_clients import finish_joins_done_between_polls

    finish_joins_done_between_polls()
    assert BaseCoordinator.join_group_async.finishes_done_joins
    original = inspect.getsource(inspect.getmodule(BaseCoordinator))
    # the success path our patch repeats, and the task it reads
    for line in ("self.rejoining = False", "self.rejoin_needed = False", "self.state = MemberState.STABLE",
                 "self._enable_heartbeat()", "self._join_task = self._manager.call_soon(self._do_join_and_sync_async)"):
        assert line in original, line
    assert "super().need_rejoin()" in inspect.getsource(ConsumerCoordinator.need_rejoin)
    assert inspect.iscoroutinefunction(ConsumerCoordinator._on_join_complete_async)
    assert MemberState.STABLE
