"""A replay job (route or rescore): a fixed range of a topic replayed into other topics, exactly once.

`ReplayJob(config, spec)` checks its arguments (nothing is touched yet); `prepare()` checks
the topics, fixes or resumes the range, loads the snapshot, refuses outputs another writer
uses and records the job's start; `run()` replays what is left with
`kafka_loop.TransactionalLoop` and `RangeBounds` until the range is done or a signal stops
it, and returns a `ReplayResult`. The job's identity and range live in its consumer group's
committed offsets (`replay.job`), so running the same job again resumes it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

from streamfilter.config import Config
from streamfilter.errors import ConfigError
from streamfilter.replay import job
from streamfilter.replay.ranges import describe, parse_range, resolve, window_of
from streamfilter.replay.spec import ReplaySpec

log = logging.getLogger("streamfilter.replay")


@dataclass(frozen=True)
class ReplayResult:
    """How a run of a job ended; counts are this process's."""

    job_id: str
    mode: str
    output: str
    completed: bool  # every partition's range is committed
    interrupted: bool  # stopped by SIGTERM or SIGINT
    resumed: bool  # the job had started before this run
    done: int  # offsets of the range behind the committed position
    total: int  # offsets in the range
    documents: int
    kept: int  # route: kept; rescore: scored
    rejected: int
    dlq: int
    elapsed_s: float
    resumed_at: int = 0  # offsets of the range already done when this run started


class ReplayJob:
    """One replay of a fixed range: its input, range and time window, mode, policy, snapshot, outputs and progress.

    Builds its transform from `config` with its own output topics, and never changes `config`.
    """

    def __init__(self, config: Config, spec: ReplaySpec):
        if spec.mode not in ("route", "rescore"):
            raise ValueError(f"a replay job routes or rescores, not {spec.mode!r}")
        self.config = config
        self.spec = spec
        self.mode = spec.mode
        self.start, self.end = parse_range(spec.start, spec.end)
        self.input_topic = spec.input or (config.topics.raw if self.mode == "rescore" else config.topics.scored)
        if not spec.output:
            raise ConfigError(f"--output: required with --mode {self.mode}")
        if self.mode == "rescore" and spec.route_options_given:
            raise ConfigError("--policy, --keep-rate, --quality-keep, --seed, --snapshot and --rejected-output apply to "
                              "--mode route and dry-run; rescore writes scored records")
        self.output = spec.output
        self.rejected_output = spec.rejected_output or ""
        self.dlq = spec.dlq or f"{spec.output}.dlq"
        if self.input_topic in (self.output, self.rejected_output, self.dlq):
            raise ConfigError(f"--output/--rejected-output/--dlq: {self.input_topic!r} is the input topic")
        self.digest = job.spec_digest(self.fields())
        self.job_id = spec.job_id or job.default_job_id(self.digest)
        self.group = job.group_of(config, self.job_id)
        self.state: job.JobState | None = None  # fixed (or read back) by `prepare`
        self.resumed = False
        self.snapshot = None  # route: the snapshot every decision uses (None for a policy that needs none)
        self.transform = None
        self.progress = None  # replay.progress.Progress, while and after `run`

    def fields(self) -> dict:
        """What identifies the job (its digest): the range, the outputs and the policy or the models."""
        spec = self.spec
        fields = {"mode": self.mode, "input": self.input_topic, "output": self.output,
                  "rejected": self.rejected_output, "dlq": self.dlq, "from": spec.start, "to": spec.end}
        if self.mode == "route":
            p = self.config.policy
            fields.update(policy=p.name, keep_rate=p.keep_rate, quality_keep=p.quality_keep, seed=p.seed,
                          snapshot=spec.snapshot)
        else:
            m = self.config.models
            fields.update(askllm=m.askllm, embedder=m.embedder, max_tokens=m.max_tokens, variant=m.variant)
        return fields

    # ------------------------------------------------------------------------- prepare

    def prepare(self) -> bool:
        """Check everything and record the job's start before anything is produced; False when the job
        is already complete (nothing to do)."""
        from streamfilter.daemon import ensure_topics
        from streamfilter.kafka_clients import new_consumer
        from streamfilter.replay.checks import check_outputs_unused, check_topic

        probe = new_consumer(self.config, self.group, allow_auto_create_topics=False)
        try:
            check_topic(probe, self.input_topic, "input")
            state = job.load(probe, self.input_topic)
            self.resumed = state is not None
            if self.resumed and state.spec != self.digest:
                raise ConfigError(f"--job-id {self.job_id}: that job was started with other arguments; "
                                  "rerun it with its own arguments or choose another --job-id")
            if self.resumed and state.complete:
                self.state = state
                return False
            if not self.resumed:
                ranges = resolve(probe, self.input_topic, self.start, self.end)
                state = job.JobState(self.digest, ranges, window_of(self.start, self.end), "",
                                     {p: s for p, (s, _) in ranges.items()})
            self.state = state
            if self.mode == "route":
                self._prepare_route(probe)
            else:
                self.transform = self.build_transform()
            if not self.spec.append:
                check_outputs_unused(self.config, [self.output, self.rejected_output], self.job_id)
            ensure_topics(self.config, [self.output, self.rejected_output, self.dlq],
                          {self.output: "--output", self.rejected_output: "--rejected-output", self.dlq: "--dlq"})
            if not self.resumed:
                job.record_start(probe, self.input_topic, state)
        finally:
            probe.close(autocommit=False)
        return True

    def _prepare_route(self, probe) -> None:
        """Load the snapshot (a resumed job keeps the one it started with) and build the route with it."""
        from streamfilter.config import build_policy
        from streamfilter.replay.checks import first_embedding_dim, load_snapshot

        state, spec = self.state, self.spec
        config = self.config
        ref = state.snapshot_id if (self.resumed and state.snapshot_id and spec.snapshot == "latest") else spec.snapshot
        dim = first_embedding_dim(probe, self.input_topic, state.ranges)  # also: the range holds scored records
        snapshot = load_snapshot(config, ref, dim, required=build_policy(config).needs_snapshot)
        sid = snapshot.snapshot_id if snapshot is not None else ""
        if self.resumed and sid != state.snapshot_id:
            raise ConfigError(f"--snapshot {spec.snapshot}: job {self.job_id} started with snapshot "
                              f"{state.snapshot_id or '(none)'}, not {sid or '(none)'}")
        state.snapshot_id = sid
        self.snapshot = snapshot
        self.transform = self.build_transform(snapshot)

    def build_transform(self, snapshot=None):
        """The job's transform: route: a `RouteTransform` fixed on `snapshot`; rescore: a `ScoreTransform`
        (its models load when the loop starts)."""
        if self.mode == "route":
            from streamfilter.replay.checks import fixed_route

            return fixed_route(self.config, snapshot, self.job_id, accepted_topic=self.output,
                               rejected_topic=self.rejected_output, dlq_topic=self.dlq)
        from streamfilter.stages import ScoreTransform

        return ScoreTransform.from_config(self.config, scored_topic=self.output, dlq_topic=self.dlq, job=self.job_id,
                                          stage="replay")

    # ------------------------------------------------------------------------- run

    def run(self) -> ReplayResult:
        """Replay what is left of the range, exactly once; returns when it is done or a signal stopped it."""
        from kafka.structs import TopicPartition

        from streamfilter.kafka_clients import new_consumer
        from streamfilter.kafka_loop import RangeBounds, TransactionalLoop
        from streamfilter.replay.progress import Progress

        state = self.state
        if state is None or self.transform is None:
            raise RuntimeError("ReplayJob.run before prepare")
        tps = {p: TopicPartition(self.input_topic, p) for p in state.ranges}
        bounds = RangeBounds(start={tps[p]: s for p, (s, _) in state.ranges.items()},
                             end={tps[p]: e for p, (_, e) in state.ranges.items()},
                             metadata={tps[p]: state.metadata(p) for p in state.ranges})
        self.progress = Progress(state.total, state.done, style=self.spec.progress,
                                 interval_s=self.spec.progress_interval_s, label=f"replay {self.job_id}")
        loop = TransactionalLoop("replay", self.config, self.input_topic, _Windowed(self.transform, state.window),
                                 prepare=self.transform.load if self.mode == "rescore" else None,
                                 group=self.group, transactional_id=self.group, bounds=bounds,
                                 on_commit=_CommitCounter(self.progress, state, self.output, self.dlq),
                                 dlq_topic=self.dlq)
        log.info("%s replay job %s (%s): %s %s → %s%s", "resuming" if self.resumed else "starting", self.job_id,
                 self.mode, self.input_topic, describe(state.ranges), self.output,
                 f", snapshot {state.snapshot_id}" if state.snapshot_id else "")
        if self.resumed:
            log.info("replay job %s: %d of %d offsets were already done", self.job_id, state.done, state.total)
        resumed_at = state.done
        started = time.monotonic()
        interrupted = run_until_signal(loop)
        self.progress.finish()
        elapsed = time.monotonic() - started
        done = self.progress.done
        if loop.completed:
            closer = new_consumer(self.config, self.group)
            try:
                job.record_end(closer, self.input_topic, state)
            finally:
                closer.close(autocommit=False)
            done = state.done
        p = self.progress
        return ReplayResult(self.job_id, self.mode, self.output, loop.completed, interrupted, self.resumed, done,
                            state.total, p.documents, p.kept, p.rejected, p.dlq, elapsed, resumed_at)


class _Windowed:
    """Drops records whose message timestamp is outside the replay's time window, then transforms."""

    def __init__(self, transform, window):
        self.transform = transform
        self.window = window

    def __call__(self, records: list):
        return self.transform(self.window.select(records))


class _CommitCounter:
    """The loop's commit hook: advances the progress by what each committed batch covered."""

    def __init__(self, progress, state: job.JobState, output: str, dlq: str):
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


def run_until_signal(loop) -> bool:
    """Run a TransactionalLoop to completion or until SIGTERM/SIGINT; True when a signal stopped it."""
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
