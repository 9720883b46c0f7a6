"""The CLI's log set-up: a client closed mid-refresh is not reported as an error."""

from __future__ import annotations

import logging

from kafka.errors import Cancelled, KafkaConnectionError, NotCoordinatorError, UnstableOffsetCommitError

from streamfilter.commands import _not_cancelled_refresh, _not_unstable_offsets


def _record(exc) -> logging.LogRecord:
    return logging.LogRecord("kafka.cluster", logging.ERROR, __file__, 1, "Metadata refresh: failed %s", (exc,), None)


def test_only_the_cancelled_metadata_refresh_is_dropped():
    assert not _not_cancelled_refresh(_record(Cancelled()))
    assert _not_cancelled_refresh(_record(KafkaConnectionError("broker away")))
    other = logging.LogRecord("kafka.cluster", logging.ERROR, __file__, 1, "something else %s", (Cancelled(),), None)
    assert _not_cancelled_refresh(other)


def test_only_the_retried_unstable_offsets_fetch_is_dropped():
    def record(msg, *args):
        return logging.LogRecord("kafka.coordinator.consumer", logging.ERROR, __file__, 1, msg, args, None)

    assert not _not_unstable_offsets(record("Unknown error fetching offsets for %s: %s", "t-0",
                                            UnstableOffsetCommitError()))
    assert not _not_unstable_offsets(record("Unknown error fetching offsets: %s", UnstableOffsetCommitError()))
    assert _not_unstable_offsets(record("Unknown error fetching offsets for %s: %s", "t-0", NotCoordinatorError()))


def test_kafka_warnings_are_summarised_one_line_per_condition_with_a_count():
    from streamfilter.commands import KafkaLogSummary

    now = [0.0]
    summary = KafkaLogSummary(window_s=60, clock=lambda: now[0])

    def record(msg, *args, name="kafka.net.connection", level=logging.WARNING):
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    passed = []
    for i in range(300):  # a broker outage: the same failure five times a second for a minute
        now[0] = i * 0.2
        r = record("%s: Connection to broker failed: %s", f"<conn {i % 3}>", KafkaConnectionError("refused"))
        if summary.filter(r):
            passed.append(r.getMessage())
    other = record("Heartbeat failed: %s", NotCoordinatorError(), name="kafka.coordinator")
    assert summary.filter(other)  # another condition has its own line
    assert summary.filter(record("%s: Connection to broker failed: %s", "<conn 0>", Cancelled()))  # another error type
    assert len(passed) == 1
    now[0] = 61.0
    r = record("%s: Connection to broker failed: %s", "<conn 0>", KafkaConnectionError("refused"))
    assert summary.filter(r) and "299 more like this in the last 61 s" in r.getMessage()
    assert summary.filter(logging.LogRecord("streamfilter.daemon", logging.WARNING, __file__, 1, "ours", (), None))
    assert summary.filter(record("%s: connecting", "<conn 0>", level=logging.INFO))  # below WARNING: untouched


def test_counts_still_open_are_logged_at_exit(caplog):
    from streamfilter.commands import KafkaLogSummary

    summary = KafkaLogSummary(window_s=60, clock=lambda: 5.0)
    for _ in range(4):
        summary.filter(logging.LogRecord("kafka.client", logging.ERROR, __file__, 1, "boom %s", ("x",), None))
    with caplog.at_level(logging.ERROR, logger="kafka.client"):
        summary.flush()
    assert [r.getMessage() for r in caplog.records] == ["boom x (3 more like this in the last 0 s)"]
