"""Range positions, job descriptions and progress output (no Kafka)."""

from __future__ import annotations

import io
import json

import pytest

from streamfilter.errors import ConfigError
from streamfilter.replay.job import JobState, default_job_id, spec_digest
from streamfilter.replay.progress import Progress
from streamfilter.replay.ranges import ALL_PARTITIONS, TimeWindow, check_order, parse_position, window_of

NOW_MS = 1_714_564_800_000  # 2024-05-01T12:00:00Z


@pytest.mark.parametrize("text, kind, value", [
    ("earliest", "earliest", None),
    ("latest", "latest", None),
    ("1200", "offset", {ALL_PARTITIONS: 1200}),
    ("0:1200,2:40", "offset", {0: 1200, 2: 40}),
    ("2024-05-01T12:00:00Z", "time", NOW_MS),
    ("2024-05-01T14:00:00+02:00", "time", NOW_MS),
    ("2024-05-01T12:00:00", "time", NOW_MS),  # no zone: UTC
    ("@1714564800000", "time", NOW_MS),
    ("now-2h", "time", NOW_MS - 2 * 3600_000),
    ("-30m", "time", NOW_MS - 30 * 60_000),
    ("-1.5d", "time", NOW_MS - 36 * 3600_000),
])
def test_positions_parse(text, kind, value):
    position = parse_position(text, "--from", now_ms=NOW_MS)
    assert position.kind == kind
    if kind == "offset":
        assert position.offsets == value
    elif kind == "time":
        assert position.time_ms == value


@pytest.mark.parametrize("text", ["", "yesterday", "0:1,0:2", "12:", "-2w", "2024-13-45"])
def test_bad_positions_name_the_flag(text):
    with pytest.raises(ConfigError, match="^--to "):
        parse_position(text, "--to", now_ms=NOW_MS)


@pytest.mark.parametrize("start, end", [("200", "100"), ("0:5", "0:4"), ("latest", "earliest"),
                                        ("2024-05-02", "2024-05-01"), ("-1h", "-2h")])
def test_reversed_ranges_are_refused_before_kafka(start, end):
    with pytest.raises(ConfigError, match="is after --to"):
        check_order(parse_position(start, "--from", NOW_MS), parse_position(end, "--to", NOW_MS))


def test_mixed_positions_are_left_to_the_resolution():
    check_order(parse_position("500", "--from"), parse_position("2024-05-01", "--to"))
    check_order(parse_position("0:9", "--from"), parse_position("1:3", "--to"))  # other partitions


def test_time_window_is_half_open():
    window = window_of(parse_position("@1000", "--from"), parse_position("@2000", "--to"))
    assert [window.contains(t) for t in (999, 1000, 1999, 2000)] == [False, True, True, False]
    assert TimeWindow().unbounded and TimeWindow().select([1, 2]) == [1, 2]


def test_job_state_progress_and_metadata():
    state = JobState("abc", {0: (10, 20), 1: (0, 5), 2: (7, 7)}, TimeWindow(1, None), "snap-1",
                     committed={0: 15, 1: 0, 2: 7})
    assert (state.total, state.done, state.complete) == (15, 5, False)
    meta = json.loads(state.metadata(0))
    assert meta == {"sf-replay": 1, "spec": "abc", "start": 10, "end": 20, "from_ms": 1, "to_ms": None,
                    "snapshot": "snap-1"}
    assert len(state.metadata(0)) < 4096  # the broker's default offset.metadata.max.bytes
    state.committed.update({0: 20, 1: 5})
    assert state.complete and state.done == state.total


def test_job_ids_follow_the_arguments():
    a = spec_digest({"mode": "route", "from": "earliest", "policy": "askllm"})
    assert a == spec_digest({"policy": "askllm", "from": "earliest", "mode": "route"})
    assert a != spec_digest({"mode": "route", "from": "earliest", "policy": "density"})
    assert default_job_id(a).startswith("replay-")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_on_a_terminal():
    stream = FakeTerminal()
    progress = Progress(1000, done=200, stream=stream, label="replay j")
    progress.add(300, 300, kept=90, rejected=210)
    progress.finish()
    text = stream.getvalue()
    assert text.startswith("\rreplay j [") and "50.0%" in text and "kept 90 (30.0%)" in text
    assert "docs/s" in text and "ETA" in text and text.endswith("\n")


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    stream = io.StringIO()
    progress = Progress(100, stream=stream, interval_s=0)
    with caplog.at_level("INFO", logger="streamfilter.replay"):
        progress.add(50, 50, kept=10)
        progress.finish()
    assert stream.getvalue() == ""
    assert any("50/100 offsets" in r.getMessage() for r in caplog.records)
