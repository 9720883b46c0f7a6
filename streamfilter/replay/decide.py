"""Deciding a fixed range without writing anything: a dry-run (one policy, as a route replay would)
and a comparison (several policies over the same documents).

Both read the range without a consumer group (`reader.read_range`) and report what
`compare.Comparison` counts; printing is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from streamfilter.config import Config
from streamfilter.errors import ConfigError, UserError
from streamfilter.replay.ranges import Position, parse_range
from streamfilter.replay.spec import CompareSpec, ReplaySpec


class ScoredRange:
    """An open read of a fixed range of a scored topic: its offsets, time window and embedding dimension."""

    def __init__(self, config: Config, topic: str, start: Position, end: Position):
        from streamfilter.kafka_clients import new_consumer
        from streamfilter.replay import ranges
        from streamfilter.replay.checks import check_topic, first_embedding_dim

        self.config = config
        self.topic = topic
        self.consumer = new_consumer(config, None, allow_auto_create_topics=False)
        try:
            check_topic(self.consumer, topic, "input")
            self.ranges = ranges.resolve(self.consumer, topic, start, end)
            self.dim = first_embedding_dim(self.consumer, topic, self.ranges)
        except BaseException:
            self.close()
            raise
        self.window = ranges.window_of(start, end)

    def batches(self) -> Iterator[tuple[list, int]]:
        """(scored records in the time window, undecodable count) per batch of the range."""
        from streamfilter.errors import InvalidDocument
        from streamfilter.records import decode_scored
        from streamfilter.replay.reader import read_range

        for records in read_range(self.config, self.topic, self.ranges, self.config.batch.max_batch_docs,
                                  consumer=self.consumer):
            scored, bad = [], 0
            for record in self.window.select(records):
                try:
                    scored.append(decode_scored(record.value))
                except InvalidDocument:
                    bad += 1
            yield scored, bad

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class DryRun:
    """What a route replay of the range would keep under the configured policy and snapshot; writes nothing.

    Use as a context manager: entering reads the range's bounds and loads the snapshot
    (`ranges`, `label`, `snapshot` then say what will be decided); `run` decides it.
    """

    def __init__(self, config: Config, spec: ReplaySpec):
        self.config = config
        self.spec = spec
        self.start, self.end = parse_range(spec.start, spec.end)
        self.input_topic = spec.input or config.topics.scored
        self.reader: ScoredRange | None = None
        self.snapshot = None
        self.route = None

    def __enter__(self) -> DryRun:
        from streamfilter.config import build_policy
        from streamfilter.replay.checks import fixed_route, load_snapshot

        self.reader = ScoredRange(self.config, self.input_topic, self.start, self.end)
        try:
            policy = build_policy(self.config)
            self.snapshot = load_snapshot(self.config, self.spec.snapshot, self.reader.dim,
                                          required=policy.needs_snapshot)
            self.route = fixed_route(self.config, self.snapshot)
        except BaseException:
            self.reader.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()

    @property
    def ranges(self) -> dict[int, tuple[int, int]]:
        return self.reader.ranges

    @property
    def label(self) -> str:
        policy = self.route.policy
        return f"{policy.name}@{policy.keep_rate:g}"

    def run(self, on_keep: Callable | None = None) -> dict:
        """Decide the range; `on_keep(scored record, decision)` for the first `spec.show` kept documents
        (all with -1). Returns the comparison report of the one policy, with `undecodable`."""
        from streamfilter.replay.compare import Comparison
        from streamfilter.stages import decide_scored

        policy = self.route.policy
        comparison = Comparison([self.label], [policy.keep_rate], by=self.spec.by)
        shown, bad = 0, 0
        limit = math.inf if self.spec.show < 0 else self.spec.show
        for scored, undecodable in self.reader.batches():
            bad += undecodable
            decisions = decide_scored(self.route.prepared, scored)
            comparison.add([s.document for s in scored], [decisions])
            for s, d in zip(scored, decisions):
                if d.keep and shown < limit:
                    shown += 1
                    if on_keep is not None:
                        on_keep(s, d)
        report = comparison.report()
        report["undecodable"] = bad
        return report


def parse_policy_spec(text: str, config: Config):
    """`NAME` or `NAME:key=value,...` (keep_rate, quality_keep, seed, snapshot) → (label, Policy, snapshot ref).

    Parameters not given are the configuration's (`policy.keep_rate`, `policy.seed`, and
    `policy.quality_keep` when NAME is the configured policy and has a quality gate)."""
    from streamfilter.policies import build_policy, policy_class

    name, _, rest = text.partition(":")
    values = {"keep_rate": config.policy.keep_rate, "seed": config.policy.seed}
    if name == config.policy.name and policy_class(name).has_quality_gate:  # the configured gate, unless given
        values["quality_keep"] = config.policy.quality_keep
    snapshot = None
    aliases = {"keep": "keep_rate", "quality": "quality_keep"}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = aliases.get(key.strip(), key.strip())
        if not sep or key not in ("keep_rate", "quality_keep", "seed", "snapshot"):
            raise ConfigError(f"policy {text!r}: expected NAME:keep_rate=F,quality_keep=F,seed=N,snapshot=REF")
        if key == "snapshot":
            snapshot = value
            continue
        try:
            values[key] = int(value) if key == "seed" else float(value)
        except ValueError:
            raise ConfigError(f"policy {text!r}: {key} must be a number, got {value!r}") from None
    try:
        policy = build_policy(name, values["keep_rate"], quality_keep=values.get("quality_keep"), seed=values["seed"])
    except ConfigError as exc:
        detail = str(exc).removeprefix("policy: ")
        raise ConfigError(f"policy {text!r}: {detail}") from None
    return text, policy, snapshot


class PolicyComparison:
    """Two or more policies decide the same range; `run` returns the report (`compare.Comparison`'s,
    with `undecodable` and `range`). Every policy is checked before Kafka is touched."""

    def __init__(self, config: Config, spec: CompareSpec):
        if len(spec.policies) < 2:
            raise ConfigError("compare: name at least two policies")
        self.config = config
        self.spec = spec
        self.policies = [parse_policy_spec(text, config) for text in spec.policies]
        self.start, self.end = parse_range(spec.start, spec.end)
        self.input_topic = spec.input or config.topics.scored
        self.ranges: dict[int, tuple[int, int]] = {}  # fixed by `run`

    def run(self) -> dict:
        from streamfilter.policies import PolicyNotReady
        from streamfilter.replay.checks import load_snapshot
        from streamfilter.replay.compare import Comparison
        from streamfilter.stages import decide_scored

        reader = ScoredRange(self.config, self.input_topic, self.start, self.end)
        try:
            self.ranges = reader.ranges
            prepared = []
            for label, policy, ref in self.policies:
                snapshot = load_snapshot(self.config, ref or self.spec.snapshot, reader.dim,
                                         required=policy.needs_snapshot)
                try:
                    prepared.append(policy.prepare(snapshot))
                except PolicyNotReady as exc:
                    raise UserError(f"policy {label!r}: {exc}") from None
            comparison = Comparison([label for label, _, _ in self.policies],
                                    [p.keep_rate for _, p, _ in self.policies], by=self.spec.by)
            bad = 0
            for scored, undecodable in reader.batches():
                bad += undecodable
                comparison.add([s.document for s in scored], [decide_scored(p, scored) for p in prepared])
        finally:
            reader.close()
        report = comparison.report()
        report["undecodable"] = bad
        report["range"] = {"topic": self.input_topic, "partitions": {str(p): list(r) for p, r in self.ranges.items()}}
        return report
