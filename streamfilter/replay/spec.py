"""What a replay or a comparison was asked to do: its arguments as plain values, before Kafka is touched.

`ReplaySpec` is one `streamfilter replay` (route, rescore or dry-run), `CompareSpec` one
comparison of policies. Both are frozen: a job derives what it needs from them and from
the loaded configuration (`with_batch_docs`, `dataclasses.replace`) and changes neither.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from streamfilter.config import Config
from streamfilter.errors import ConfigError

MODES = ("route", "rescore", "dry-run")
DEFAULT_BY = ("meta.topic",)


@dataclass(frozen=True)
class ReplaySpec:
    """One replay: a range of an input topic, what to do with it and where the results go."""

    mode: str = "route"  # one of MODES
    input: str | None = None  # None: topics.scored (rescore: topics.raw)
    start: str = "earliest"  # --from, inclusive (replay.ranges)
    end: str = "latest"  # --to, exclusive, fixed when the job starts
    output: str | None = None  # kept documents (route) or scored records (rescore)
    rejected_output: str | None = None  # route: rejected documents too
    dlq: str | None = None  # None: OUTPUT.dlq
    append: bool = False  # write into an output that holds another writer's records
    snapshot: str = "latest"  # file, snapshot id or latest
    job_id: str | None = None  # None: derived from the arguments (replay.job.default_job_id)
    # --policy, --keep-rate, --quality-keep, --seed: overrides of policy.* (None: as configured)
    policy: str | None = None
    keep_rate: float | None = None
    quality_keep: float | None = None
    seed: int | None = None
    batch_docs: int | None = None  # documents per transaction, fixed (None: adaptive, from batch.*)
    progress: str = "auto"  # auto | bar | log | none
    progress_interval_s: float = 10.0
    show: int = 10  # dry-run: kept documents to list (-1 = all)
    by: tuple[str, ...] = DEFAULT_BY  # dry-run: fields the kept share is broken down by

    def policy_overrides(self) -> list[str]:
        """The policy flags given, as `section.key=value` overrides for `load_config`."""
        flags = (("policy.name", self.policy), ("policy.keep_rate", self.keep_rate),
                 ("policy.quality_keep", self.quality_keep), ("policy.seed", self.seed))
        return [f"{key}={value}" for key, value in flags if value is not None]

    @property
    def route_options_given(self) -> bool:
        """Whether an option only route and dry-run take was given (a policy flag, a snapshot, a rejected output)."""
        return bool(self.policy or self.keep_rate or self.quality_keep or self.seed is not None
                    or self.snapshot != "latest" or self.rejected_output)


@dataclass(frozen=True)
class CompareSpec:
    """One comparison: two or more policies (`NAME` or `NAME:key=value,...`) decide the same range."""

    policies: tuple[str, ...]
    input: str | None = None  # None: topics.scored
    start: str = "earliest"
    end: str = "latest"
    snapshot: str = "latest"  # for the policies whose spec names none
    by: tuple[str, ...] = DEFAULT_BY


def with_batch_docs(config: Config, batch_docs: int | None) -> Config:
    """`config` with a fixed transaction size of `batch_docs` documents (`--batch-docs`), or `config` itself."""
    if batch_docs is None:
        return config
    if batch_docs < 1:
        raise ConfigError(f"--batch-docs: must be >= 1, got {batch_docs}")
    batch = dataclasses.replace(config.batch, base_batch_docs=batch_docs, max_batch_docs=batch_docs)
    return dataclasses.replace(config, batch=batch)
