"""The CLI's log set-up: a client closed mid-refresh is not reported as an error."""

from __future__ import annotations

import logging

from kafka.errors import Cancelled, KafkaConnectionError, NotCoordinatorError, UnstableOffsetCommitError

from streamfilter.cli import _not_cancelled_refresh, _not_unstable_offsets


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
