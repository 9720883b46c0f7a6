"""`streamfilter replay` and `streamfilter compare`.

    replay --mode route    scored records of a range → decisions of a policy and snapshot → --output
                           (and --rejected-output), exactly once, resumable: the live route's code
    replay --mode rescore  raw records of a range → the models → scored records in --output
    replay --mode dry-run  decide a range and print what would be kept; nothing is written
    replay --compare A B   (or `compare A B`) decide a range with two policies and report the differences

Every argument is checked, and the range fixed, before anything is produced: a bad one
fails with one line (UserError/ConfigError). The transactional part is
`kafka_loop.TransactionalLoop` with `RangeBounds`; the job's identity and range live in its
consumer group's committed offsets (`replay.job`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

from streamfilter.density.policy import POLICY_NAMES
from streamfilter.errors import ConfigError, UserError

log = logging.getLogger("streamfilter.replay")

MODES = ("route", "rescore", "dry-run")


def register(subparsers) -> None:
    from streamfilter.commands.options import add_config_arguments

    text = "re-route or re-score a range of a topic under another policy or snapshot, exactly once"
    p = subparsers.add_parser("replay", help=text, description=text + " (see README, 'Replay').")
    add_config_arguments(p)
    _range_arguments(p)
    p.add_argument("--mode", choices=MODES, default="route",
                   help="route: scored → decisions (no models); rescore: raw → scored (runs the models); "
                        "dry-run: print what would be kept (default route)")
    p.add_argument("--output", metavar="TOPIC", help="where kept documents (route) or scored records (rescore) go")
    p.add_argument("--rejected-output", metavar="TOPIC", help="route: also write rejected documents here")
    p.add_argument("--dlq", metavar="TOPIC", help="undecodable input (default: OUTPUT.dlq)")
    p.add_argument("--append", action="store_true",
                   help="write into an output topic that already holds records of another job or the live route")
    _policy_arguments(p)
    p.add_argument("--job-id", help="names the replay's consumer group and transactional id; rerunning with the "
                                    "same id resumes it (default: derived from the arguments)")
    p.add_argument("--compare", nargs=2, metavar=("POLICY_A", "POLICY_B"),
                   help="compare two policies over the range instead of replaying (see `compare`)")
    _report_arguments(p)
    p.add_argument("--show", type=int, default=10, metavar="N",
                   help="dry-run: list the first N documents that would be kept (default 10; -1 = all)")
    p.add_argument("--batch-docs", type=int, metavar="N",
                   help="documents per transaction, fixed (default: adaptive, from batch.base_batch_docs "
                        "growing to batch.max_batch_docs while the range has more to read)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="a bar on a terminal, log lines otherwise (default auto)")
    p.add_argument("--progress-interval-s", type=float, default=10.0, help="seconds between progress log lines")
    p.set_defaults(handler=run_replay)

    text = "compare policies over a range of scored records: keep rates, overlap, scores, kept share per topic"
    c = subparsers.add_parser("compare", help=text, description=text + ". POLICY is NAME or "
                              "NAME:keep_rate=F,quality_keep=F,seed=N,snapshot=REF, e.g. askllm:keep_rate=0.2.")
    add_config_arguments(c)
    _range_arguments(c)
    c.add_argument("policies", nargs="+", metavar="POLICY", help="two or more policies")
    c.add_argument("--snapshot", default="latest", help="file, snapshot id or latest (default latest)")
    _report_arguments(c)
    c.set_defaults(handler=run_compare_command, batch_docs=None)


def _range_arguments(p) -> None:
    p.add_argument("--input", metavar="TOPIC", help="topic to replay (default: topics.scored; rescore: topics.raw)")
    p.add_argument("--from", dest="start", default="earliest", metavar="POS",
                   help="first position, inclusive: earliest, an offset (1200, 0:1200,1:800), a time "
                        "(2024-05-01T12:00:00Z, @UNIX_MS) or an age (now-2h) (default earliest)")
    p.add_argument("--to", dest="end", default="latest", metavar="POS",
                   help="end position, exclusive, fixed when the replay starts (default latest)")


def _policy_arguments(p) -> None:
    p.add_argument("--policy", help=f"policy name (policy.name): {', '.join(POLICY_NAMES)}")
    p.add_argument("--keep-rate", type=float, help="target keep rate (policy.keep_rate)")
    p.add_argument("--quality-keep", type=float, help="askllm+density's quality gate (policy.quality_keep)")
    p.add_argument("--seed", type=int, help="policy seed for the coins (policy.seed)")
    p.add_argument("--snapshot", default="latest",
                   help="snapshot file, snapshot id in sketch.snapshot_dir, or latest (default latest)")


def _report_arguments(p) -> None:
    p.add_argument("--by", action="append", metavar="FIELD",
                   help="break the kept share down by this field (lang, url, meta.KEY; repeatable; "
                        "default meta.topic)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")


# ----------------------------------------------------------------------------- set-up


def _config(args):
    from streamfilter.commands.options import config_from_args

    # kafka-python warns whenever one of its I/O tasks takes > 100 ms, which a busy machine does
    # often; a one-shot command's output is for the user's range, not for that.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)

    overrides = []
    for flag, key in (("policy", "policy.name"), ("keep_rate", "policy.keep_rate"),
                      ("quality_keep", "policy.quality_keep"), ("seed", "policy.seed")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    args.set = list(args.set) + overrides
    if args.metrics_port is None:
        args.set.append("daemon.metrics_port=0")  # a replay beside a daemon must not take its port
    config = config_from_args(args)
    if args.batch_docs is not None:
        if args.batch_docs < 1:
            raise ConfigError(f"--batch-docs: must be >= 1, got {args.batch_docs}")
        config.batch.base_batch_docs = config.batch.max_batch_docs = args.batch_docs
    return config


def _check_topic(consumer, topic: str, what: str) -> None:
    if topic not in consumer.topics():
        raise UserError(f"{what} topic {topic!r} does not exist")


def _load_snapshot(config, ref: str, policy, dim: int | None, required: bool):
    """The snapshot for `policy` (None for random when there is none), checked against the config and input."""
    from streamfilter.density import snapshots

    if not required:
        try:
            return snapshots.find(ref, config.sketch.snapshot_dir)[1]
        except UserError:
            if ref != "latest":
                raise
            return None
    path, snapshot = snapshots.find(ref, config.sketch.snapshot_dir)
    label = ref if Path(ref) == path else f"{ref} ({path.name})"
    mismatch = snapshots.config_mismatch(snapshot, config)
    if mismatch:
        raise ConfigError(f"--snapshot {label}: other sketch parameters ({mismatch})")
    if dim is not None and snapshot.sketch.dim != dim:
        raise ConfigError(f"--snapshot {label}: it sketches {snapshot.sketch.dim}-dimensional embeddings; "
                          f"the input's are {dim}-dimensional")
    return snapshot


SCORED_PROBE_RECORDS = 20  # per partition: how far into the range a route replay looks for scored records


def _first_embedding_dim(consumer, topic: str, ranges) -> int | None:
    """The embedding dimension of the first decodable scored record in the range (None if there is none).

    Raises `UserError` when the range has records but none of the first ones (up to
    `SCORED_PROBE_RECORDS` per partition) is a scored record: a route replay of a raw or an
    output topic would send every record to the DLQ."""
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


def _check_outputs_unused(config, topics: list[str], job_id: str, append: bool) -> None:
    """Refuse to write into an output topic that already holds records of another job or of the live
    route (their `sf-job` header, read from the newest records of each partition), unless `--append`."""
    from kafka.structs import TopicPartition

    from streamfilter.kafka_clients import new_consumer

    if append:
        return
    consumer = new_consumer(config, None, allow_auto_create_topics=False)
    try:
        existing = consumer.topics()
        for topic in filter(None, topics):
            if topic not in existing:
                continue
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(tps)
            ends = consumer.end_offsets(tps)
            begins = consumer.beginning_offsets(tps)
            others: dict[str, int] = {}
            for tp in tps:
                if ends[tp] <= begins[tp]:
                    continue
                consumer.seek(tp, max(begins[tp], ends[tp] - 50))  # the newest records (and markers)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in tps):
                for part in consumer.poll(timeout_ms=300).values():
                    for record in part:
                        job = dict(record.headers or ()).get("sf-job", b"").decode("utf-8", "replace")
                        if job != job_id:
                            others[job or "an unknown writer (no sf-job header)"] = \
                                others.get(job or "an unknown writer (no sf-job header)", 0) + 1
            if others:
                what = ", ".join(f"{'the live route' if j == 'live' else f'job {j!r}'} ({n} of its newest records)"
                                 for j, n in sorted(others.items()))
                raise UserError(f"--output/--rejected-output: {topic} already holds records from {what}; "
                                "replay into a new topic, or pass --append to add to it")
    finally:
        consumer.close(autocommit=False)


def _prepare_route(config, snapshot, job: str = "live"):
    from streamfilter.density.policy import PolicyNotReady
    from streamfilter.stages import RouteTransform

    try:
        return RouteTransform(config, fixed=True, snapshot=snapshot, stage="replay", job=job)
    except PolicyNotReady as exc:
        raise UserError(f"--snapshot: {exc}") from None


def _positions(args):
    from streamfilter.replay.ranges import check_order, parse_position

    start = parse_position(args.start, "--from")
    end = parse_position(args.end, "--to")
    check_order(start, end)
    return start, end


# ----------------------------------------------------------------------------- replay


def run_replay(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.compare:
        return run_compare(args, config, args.compare)
    mode = args.mode
    start, end = _positions(args)
    input_topic = args.input or (config.topics.raw if mode == "rescore" else config.topics.scored)
    if mode == "dry-run":
        return run_dry_run(args, config, input_topic, start, end)
    if not args.output:
        raise ConfigError(f"--output: required with --mode {mode}")
    if mode == "rescore" and (args.policy or args.keep_rate or args.quality_keep or args.seed is not None
                              or args.snapshot != "latest" or args.rejected_output):
        raise ConfigError("--policy, --keep-rate, --quality-keep, --seed, --snapshot and --rejected-output apply to "
                          "--mode route and dry-run; rescore writes scored records")
    dlq = args.dlq or f"{args.output}.dlq"
    outputs = [t for t in (args.output, args.rejected_output, dlq) if t]
    if input_topic in outputs:
        raise ConfigError(f"--output/--rejected-output/--dlq: {input_topic!r} is the input topic")
    return _run_transactional(args, config, mode, input_topic, start, end, dlq)


def _job_fields(args, config, mode: str, input_topic: str, dlq: str) -> dict:
    fields = {"mode": mode, "input": input_topic, "output": args.output, "rejected": args.rejected_output or "",
              "dlq": dlq, "from": args.start, "to": args.end}
    if mode == "route":
        p = config.policy
        fields.update(policy=p.name, keep_rate=p.keep_rate, quality_keep=p.quality_keep, seed=p.seed,
                      snapshot=args.snapshot)
    else:
        m = config.models
        fields.update(askllm=m.askllm, embedder=m.embedder, max_tokens=m.max_tokens, variant=m.variant)
    return fields


def _run_transactional(args, config, mode: str, input_topic: str, start, end, dlq: str) -> int:
    from kafka.structs import TopicPartition

    from streamfilter.daemon import ensure_topics
    from streamfilter.kafka_clients import new_consumer
    from streamfilter.kafka_loop import RangeBounds, TransactionalLoop
    from streamfilter.replay import job, ranges

    digest = job.spec_digest(_job_fields(args, config, mode, input_topic, dlq))
    job_id = args.job_id or job.default_job_id(digest)
    group = job.group_of(config, job_id)
    probe = new_consumer(config, group, allow_auto_create_topics=False)
    try:
        _check_topic(probe, input_topic, "input")
        state = job.load(probe, input_topic)
        resumed = state is not None
        if resumed and state.spec != digest:
            raise ConfigError(f"--job-id {job_id}: that job was started with other arguments; "
                              "rerun it with its own arguments or choose another --job-id")
        if resumed and state.complete:
            print(f"replay job {job_id} is already complete ({state.total} offsets of {input_topic}); "
                  "choose another --job-id to replay the range again")
            return 0
        if not resumed:
            window = ranges.window_of(start, end)
            fixed = ranges.resolve(probe, input_topic, start, end)
            state = job.JobState(digest, fixed, window, "", {p: s for p, (s, _) in fixed.items()})
        transform, prepare = None, None
        if mode == "route":
            route_config = _route_config(config, args.output, args.rejected_output or "", dlq)
            needs = route_config.policy.name != "random"
            ref = state.snapshot_id if (resumed and state.snapshot_id and args.snapshot == "latest") else args.snapshot
            dim = _first_embedding_dim(probe, input_topic, state.ranges)  # also: the range holds scored records
            snapshot = _load_snapshot(route_config, ref, _policy_of(route_config), dim, required=needs)
            sid = snapshot.snapshot_id if snapshot is not None else ""
            if resumed and sid != state.snapshot_id:
                raise ConfigError(f"--snapshot {args.snapshot}: job {job_id} started with snapshot "
                                  f"{state.snapshot_id or '(none)'}, not {sid or '(none)'}")
            state.snapshot_id = sid
            transform = _prepare_route(route_config, snapshot, job_id)
        else:
            from streamfilter.stages import ScoreTransform

            score_config = dataclasses.replace(config, topics=dataclasses.replace(
                config.topics, scored=args.output, dlq=dlq))
            transform = ScoreTransform(score_config, job=job_id)
            transform.stage = "replay"
            prepare = transform.load
        _check_outputs_unused(config, [args.output, args.rejected_output or ""], job_id, args.append)
        ensure_topics(config, [args.output, args.rejected_output or "", dlq],
                      {args.output: "--output", args.rejected_output or "": "--rejected-output", dlq: "--dlq"})
        if not resumed:
            job.record_start(probe, input_topic, state)
    finally:
        probe.close(autocommit=False)

    tps = {p: TopicPartition(input_topic, p) for p in state.ranges}
    bounds = RangeBounds(start={tps[p]: s for p, (s, _) in state.ranges.items()},
                         end={tps[p]: e for p, (_, e) in state.ranges.items()},
                         metadata={tps[p]: state.metadata(p) for p in state.ranges})
    from streamfilter.replay.progress import Progress

    progress = Progress(state.total, state.done, style=args.progress, interval_s=args.progress_interval_s,
                        label=f"replay {job_id}")
    counter = _CommitCounter(progress, state, args.output, dlq)
    loop = TransactionalLoop("replay", config, input_topic, _Windowed(transform, state.window), prepare=prepare,
                             group=group, transactional_id=group, bounds=bounds, on_commit=counter, dlq_topic=dlq)
    verb = "resuming" if resumed else "starting"
    log.info("%s replay job %s (%s): %s %s → %s%s", verb, job_id, mode, input_topic,
             ranges.describe(state.ranges), args.output, f", snapshot {state.snapshot_id}" if state.snapshot_id else "")
    if resumed:
        log.info("replay job %s: %d of %d offsets were already done", job_id, state.done, state.total)
    started = time.monotonic()
    interrupted = _run_loop(loop)
    progress.finish()
    elapsed = time.monotonic() - started
    if not loop.completed:
        print(f"replay job {job_id} stopped at {progress.done}/{state.total} offsets; run the same command "
              f"(or --job-id {job_id}) to resume", file=sys.stderr)
        return 130 if interrupted else 1
    closer = new_consumer(config, group)
    try:
        job.record_end(closer, input_topic, state)
    finally:
        closer.close(autocommit=False)
    kept_what = "kept" if mode == "route" else "scored"
    print(f"replay job {job_id} complete: {progress.documents} documents in {elapsed:.1f}s "
          f"({progress.documents / elapsed if elapsed > 0 else 0:,.0f} docs/s), {kept_what} {progress.kept} → "
          f"{args.output}, rejected {progress.rejected}, dlq {progress.dlq}"
          + (f" (resumed at {state.done}/{state.total} offsets)" if resumed else ""))
    return 0


def _route_config(config, accepted: str, rejected: str, dlq: str):
    topics = dataclasses.replace(config.topics, accepted=accepted, rejected=rejected, dlq=dlq)
    return dataclasses.replace(config, topics=topics)


def _policy_of(config):
    from streamfilter.config import build_policy

    return build_policy(config)


class _Windowed:
    """Drops records whose message timestamp is outside the replay's time window, then transforms."""

    def __init__(self, transform, window):
        self.transform = transform
        self.window = window

    def __call__(self, records: list):
        return self.transform(self.window.select(records))


class _CommitCounter:
    """The loop's commit hook: advances the progress by what each committed batch covered."""

    def __init__(self, progress, state, output: str, dlq: str):
        self.progress = progress
        self.window = state.window
        self.position = dict(state.committed)
        self.output, self.dlq = output, dlq

    def __call__(self, batch, outputs) -> None:
        advanced = 0
        for tp, offset in batch.next_offsets().items():
            previous = self.position.get(tp.partition, offset.offset)
            advanced += max(0, offset.offset - previous)
            self.position[tp.partition] = max(previous, offset.offset)
        documents = len(self.window.select(batch.records))
        kept = sum(1 for o in outputs if o.topic == self.output)
        dlq = sum(1 for o in outputs if o.topic == self.dlq)
        self.progress.add(advanced, documents, kept=kept, rejected=documents - kept - dlq, dlq=dlq)


def _run_loop(loop) -> bool:
    """Run a TransactionalLoop to completion or until SIGTERM/SIGINT; True when interrupted by a signal."""
    from streamfilter.daemon import event_loop_runner

    interrupted = []

    async def main() -> None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, lambda s=sig: (interrupted.append(s), stop.set()))
        await loop.run(stop)

    event_loop_runner()(main())
    return bool(interrupted)


# ----------------------------------------------------------------------------- dry-run and compare


def _read_setup(args, config, input_topic: str, start, end):
    from streamfilter.kafka_clients import new_consumer
    from streamfilter.replay import ranges

    consumer = new_consumer(config, None, allow_auto_create_topics=False)
    _check_topic(consumer, input_topic, "input")
    fixed = ranges.resolve(consumer, input_topic, start, end)
    dim = _first_embedding_dim(consumer, input_topic, fixed)
    return consumer, fixed, ranges.window_of(start, end), dim


def _scored_batches(config, consumer, input_topic, fixed, window):
    """(scored records, undecodable count) per batch of the range."""
    from streamfilter.errors import InvalidDocument
    from streamfilter.records import decode_scored
    from streamfilter.replay.reader import read_range

    for records in read_range(config, input_topic, fixed, config.batch.max_batch_docs, consumer=consumer):
        scored, bad = [], 0
        for record in window.select(records):
            try:
                scored.append(decode_scored(record.value))
            except InvalidDocument:
                bad += 1
        yield scored, bad


def run_dry_run(args, config, input_topic: str, start, end) -> int:
    from streamfilter.replay import ranges
    from streamfilter.replay.compare import Comparison, format_report
    from streamfilter.stages import decide_scored

    consumer, fixed, window, dim = _read_setup(args, config, input_topic, start, end)
    try:
        policy = _policy_of(config)
        snapshot = _load_snapshot(config, args.snapshot, policy, dim, required=policy.name != "random")
        route = _prepare_route(config, snapshot)
        label = f"{policy.name}@{policy.keep_rate:g}"
        comparison = Comparison([label], [policy.keep_rate], by=args.by or ["meta.topic"])
        print(f"dry-run: {input_topic} {ranges.describe(fixed)}, policy {label}"
              + (f", snapshot {snapshot.snapshot_id}" if snapshot else "") + "; nothing is written")
        shown, bad = 0, 0
        limit = math.inf if args.show < 0 else args.show
        for scored, undecodable in _scored_batches(config, consumer, input_topic, fixed, window):
            bad += undecodable
            decisions = decide_scored(route.prepared, scored)
            comparison.add([s.document for s in scored], [decisions])
            for s, d in zip(scored, decisions):
                if d.keep and shown < limit:
                    shown += 1
                    topic, partition, offset = s.source
                    text = " ".join(s.document.text.split())[:70]
                    print(f"keep  {s.document.id}  askllm {d.askllm:.3f}  density {d.density:.4g}  "
                          f"p {d.probability:.3f}  {text}")
    finally:
        consumer.close(autocommit=False)
    report = comparison.report()
    report["undecodable"] = bad
    print()
    print(format_report(report))
    if bad:
        print(f"\n{bad} undecodable records (a replay would send them to the DLQ)")
    _write_json(args, report)
    return 0


def parse_policy_spec(text: str, config):
    """`NAME` or `NAME:key=value,...` (keep_rate, quality_keep, seed, snapshot) → (label, Policy, snapshot ref)."""
    from streamfilter.density.policy import build_policy

    name, _, rest = text.partition(":")
    values = {"keep_rate": config.policy.keep_rate, "seed": config.policy.seed}
    if name == "askllm+density" and config.policy.name == "askllm+density":
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


def run_compare_command(args: argparse.Namespace) -> int:
    args.policy = args.keep_rate = args.quality_keep = args.seed = None
    config = _config(args)
    if len(args.policies) < 2:
        raise ConfigError("compare: name at least two policies")
    return run_compare(args, config, args.policies)


def run_compare(args, config, specs) -> int:
    from streamfilter.density.policy import PolicyNotReady
    from streamfilter.replay import ranges
    from streamfilter.replay.compare import Comparison, format_report
    from streamfilter.stages import decide_scored

    parsed = [parse_policy_spec(spec, config) for spec in specs]  # bad names fail before Kafka is touched
    start, end = _positions(args)
    input_topic = args.input or config.topics.scored
    consumer, fixed, window, dim = _read_setup(args, config, input_topic, start, end)
    try:
        prepared = []
        for label, policy, ref in parsed:
            snapshot = _load_snapshot(config, ref or args.snapshot, policy, dim, required=policy.name != "random")
            try:
                prepared.append(policy.prepare(snapshot))
            except PolicyNotReady as exc:
                raise UserError(f"policy {label!r}: {exc}") from None
        comparison = Comparison([label for label, _, _ in parsed], [p.keep_rate for _, p, _ in parsed],
                                by=args.by or ["meta.topic"])
        bad = 0
        for scored, undecodable in _scored_batches(config, consumer, input_topic, fixed, window):
            bad += undecodable
            comparison.add([s.document for s in scored], [decide_scored(p, scored) for p in prepared])
    finally:
        consumer.close(autocommit=False)
    report = comparison.report()
    report["undecodable"] = bad
    report["range"] = {"topic": input_topic, "partitions": {str(p): list(r) for p, r in fixed.items()}}
    print(f"compare: {input_topic} {ranges.describe(fixed)}")
    print(format_report(report))
    _write_json(args, report)
    return 0


def _write_json(args, report: dict) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str, allow_nan=True))
        print(f"report written to {args.json}")
