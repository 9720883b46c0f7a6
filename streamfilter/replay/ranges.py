"""Range positions (`--from`, `--to`) and their resolution to fixed offsets per partition.

A position is one of:

    earliest | latest                 the partition's first offset | its end when the replay starts
    1200                              an offset, in every partition
    0:1200,2:400                      offsets per partition; partitions not listed are not replayed
    2024-05-01T12:00:00Z | 2024-05-01 a message timestamp (ISO 8601; UTC unless it names a zone)
    @1714564800000                    a message timestamp in unix milliseconds
    now-2h | now-30m | -7d | -90s     a message timestamp relative to now (write `--from=-2h`)

`--from` is inclusive and `--to` exclusive. Offsets are clamped to what the partition
holds. A timestamp resolves to the first offset whose timestamp is at or after it; since
producers set timestamps, they need not grow with offsets, so a replay chosen by time also
skips records in the offset range whose timestamp falls outside [from, to) (`TimeWindow`):
it selects exactly the documents whose message timestamps fall in the window. The range
ends at the first record stamped at or after `--to`; a record stamped before `--to` but
appended after that one (a producer with a slow clock) lies outside it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from streamfilter.errors import ConfigError

_RELATIVE = re.compile(r"^(?:now)?-(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ALL_PARTITIONS = -1


@dataclass(frozen=True)
class Position:
    """A parsed `--from`/`--to` value."""

    kind: str  # "earliest" | "latest" | "offset" | "time"
    text: str
    flag: str = "--from"
    offsets: dict[int, int] | None = None  # kind "offset": partition (or ALL_PARTITIONS) -> offset
    time_ms: int | None = None  # kind "time"


def parse_position(text: str, flag: str, now_ms: int | None = None) -> Position:
    """Parse one position; a bad one raises ConfigError naming the flag."""
    value = text.strip()
    if value in ("earliest", "latest"):
        return Position(value, text, flag)
    if re.fullmatch(r"\d+", value):
        return Position("offset", text, flag, offsets={ALL_PARTITIONS: int(value)})
    if re.fullmatch(r"\d+:\d+(,\d+:\d+)*", value):
        offsets: dict[int, int] = {}
        for item in value.split(","):
            partition, offset = (int(x) for x in item.split(":"))
            if partition in offsets:
                raise ConfigError(f"{flag} {text!r}: partition {partition} is given twice")
            offsets[partition] = offset
        return Position("offset", text, flag, offsets=offsets)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if value.startswith("@") and re.fullmatch(r"@\d+", value):
        return Position("time", text, flag, time_ms=int(value[1:]))
    match = _RELATIVE.match(value)
    if match:
        return Position("time", text, flag, time_ms=now_ms - int(float(match[1]) * _UNIT_S[match[2]] * 1000))
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: expected earliest, latest, an offset (1200 or 0:1200,1:800), a time "
            "(2024-05-01T12:00:00Z, @UNIX_MS) or an age (now-2h)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return Position("time", text, flag, time_ms=int(moment.timestamp() * 1000))


@dataclass(frozen=True)
class TimeWindow:
    """Message timestamps [from_ms, to_ms) selected; unbounded sides are None."""

    from_ms: int | None = None
    to_ms: int | None = None

    def contains(self, timestamp_ms: int) -> bool:
        return ((self.from_ms is None or timestamp_ms >= self.from_ms)
                and (self.to_ms is None or timestamp_ms < self.to_ms))

    @property
    def unbounded(self) -> bool:
        return self.from_ms is None and self.to_ms is None

    def select(self, records: list) -> list:
        """The records whose message timestamp lies in the window (all of them when unbounded)."""
        if self.unbounded:
            return records
        return [r for r in records if self.contains(r.timestamp)]


def window_of(start: Position, end: Position) -> TimeWindow:
    return TimeWindow(start.time_ms if start.kind == "time" else None, end.time_ms if end.kind == "time" else None)


def check_order(start: Position, end: Position) -> None:
    """Reject a reversed range given as two positions of the same kind, before touching Kafka."""
    if start.kind == "latest" and end.kind == "earliest":
        raise ConfigError(f"--from {start.text!r} is after --to {end.text!r}")
    if start.kind == "time" and end.kind == "time" and start.time_ms > end.time_ms:
        raise ConfigError(f"--from {start.text!r} is after --to {end.text!r} (from > to)")
    if start.kind == "offset" and end.kind == "offset":
        for partition, first in start.offsets.items():
            last = end.offsets.get(partition, end.offsets.get(ALL_PARTITIONS))
            if last is not None and first > last:
                where = "" if partition == ALL_PARTITIONS else f" on partition {partition}"
                raise ConfigError(f"--from {start.text!r} is after --to {end.text!r}{where} (from > to)")


def parse_range(start: str, end: str) -> tuple[Position, Position]:
    """`--from` and `--to` parsed and checked against each other (ConfigError naming the flag)."""
    first, last = parse_position(start, "--from"), parse_position(end, "--to")
    check_order(first, last)
    return first, last


def resolve(consumer, topic: str, start: Position, end: Position) -> dict[int, tuple[int, int]]:
    """{partition: (first offset, end offset)} for the range, fixed now. `consumer` must be read_committed
    (its end offsets are then the last stable offsets: an open transaction's records are not in range)."""
    from kafka.structs import TopicPartition

    check_order(start, end)
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise ConfigError(f"input topic {topic!r} does not exist")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    beginning = consumer.beginning_offsets(tps)
    ending = consumer.end_offsets(tps)
    low = _offsets(consumer, tps, start, beginning, ending, default_missing=None)
    high = _offsets(consumer, tps, end, beginning, ending, default_missing=None)
    ranges = {}
    for tp in tps:
        first, last = low[tp], high[tp]
        if first is None or last is None:  # a partition that a per-partition list leaves out
            ranges[tp.partition] = (beginning[tp], beginning[tp])
            continue
        if first > last:
            raise ConfigError(f"--from {start.text!r} resolves after --to {end.text!r} on partition "
                              f"{tp.partition} (offset {first} > {last}): the range is reversed")
        ranges[tp.partition] = (first, last)
    return ranges


def _offsets(consumer, tps, position: Position, beginning, ending, default_missing):
    if position.kind == "earliest":
        return dict(beginning)
    if position.kind == "latest":
        return dict(ending)
    if position.kind == "offset":
        out = {}
        known = {tp.partition for tp in tps}
        unknown = sorted(set(position.offsets) - known - {ALL_PARTITIONS})
        if unknown:
            raise ConfigError(f"{position.flag} {position.text!r}: the topic has no partition {unknown[0]} "
                              f"(partitions {min(known)}..{max(known)})")
        for tp in tps:
            offset = position.offsets.get(tp.partition, position.offsets.get(ALL_PARTITIONS))
            out[tp] = default_missing if offset is None else min(max(offset, beginning[tp]), ending[tp])
        return out
    found = consumer.offsets_for_times({tp: max(0, position.time_ms) for tp in tps})
    # No record at or after the time: the range ends (or starts) at the partition's end.
    return {tp: ending[tp] if found.get(tp) is None else min(found[tp].offset, ending[tp]) for tp in tps}


def describe(ranges: dict[int, tuple[int, int]]) -> str:
    total = sum(e - s for s, e in ranges.values())
    parts = ", ".join(f"{p}:[{s},{e})" for p, (s, e) in sorted(ranges.items()))
    return f"{total} offsets ({parts})"

