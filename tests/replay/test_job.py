"""A replay job is an object built from a loaded configuration, which it never changes; the replay
package sits below the command line."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import streamfilter.replay
from streamfilter.config import load_config
from streamfilter.density.snapshot_store import SnapshotStore
from streamfilter.errors import ConfigError
from streamfilter.replay.run import ReplayJob
from streamfilter.replay.spec import ReplaySpec, with_batch_docs

from .conftest import build_snapshot, produce_scored, scored_records


def loaded_config(tmp_path: Path, *overrides: str):
    return load_config(None, env={}, overrides=[f"sketch.snapshot_dir={tmp_path / 'snapshots'}", "sketch.rows=100",
                                                "sketch.buckets=2000", *overrides])


def test_nothing_in_the_replay_package_imports_the_command_line():
    package = Path(streamfilter.replay.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names
                          if name == "argparse" or name == "streamfilter.commands"
                          or name.startswith("streamfilter.commands.")]
    assert not offenders, offenders


@pytest.mark.parametrize("mode", ["route", "rescore"])
def test_building_a_job_and_its_transform_leaves_the_config_unchanged(tmp_path, mode):
    config = loaded_config(tmp_path, "policy.name=askllm+density", "policy.keep_rate=0.3")
    before = dataclasses.asdict(config)
    build_snapshot(scored_records(200, seed=11), tmp_path / "snapshots")
    snapshot = SnapshotStore(tmp_path / "snapshots").latest() if mode == "route" else None

    job = ReplayJob(with_batch_docs(config, 50), ReplaySpec(mode=mode, output="out", rejected_output=None,
                                                             batch_docs=50, job_id="unchanged"))
    transform = job.build_transform(snapshot)

    assert dataclasses.asdict(config) == before
    assert transform.stage == "replay"
    assert job.config.batch.base_batch_docs == job.config.batch.max_batch_docs == 50
    if mode == "route":
        assert (transform.accepted_topic, transform.rejected_topic, transform.dlq.topic) == ("out", "", "out.dlq")
        assert transform.provenance.job == "unchanged"
    else:
        assert (transform.scored_topic, transform.dlq.topic) == ("out", "out.dlq")
        assert transform.job == "unchanged" and transform.scorer is None  # the models load when the loop starts


def test_batch_docs_derive_a_config_and_check_the_flag(tmp_path):
    config = loaded_config(tmp_path)
    before = dataclasses.asdict(config)
    assert with_batch_docs(config, None) is config
    fixed = with_batch_docs(config, 7)
    assert (fixed.batch.base_batch_docs, fixed.batch.max_batch_docs) == (7, 7)
    assert dataclasses.asdict(config) == before
    with pytest.raises(ConfigError, match="--batch-docs: must be >= 1, got 0"):
        with_batch_docs(config, 0)


def test_a_jobs_identity_is_its_range_outputs_and_policy_or_models(tmp_path):
    """The fields the job id is digested from: a change here renames every job (resuming them fails)."""
    config = loaded_config(tmp_path, "policy.name=density", "policy.keep_rate=0.2", "policy.seed=3")
    route = ReplayJob(config, ReplaySpec(output="kept", rejected_output="dropped", start="100", end="@1714564800000"))
    assert route.fields() == {
        "mode": "route", "input": config.topics.scored, "output": "kept", "rejected": "dropped", "dlq": "kept.dlq",
        "from": "100", "to": "@1714564800000", "policy": "density", "keep_rate": 0.2, "quality_keep": config.policy.quality_keep, "seed": 3,
        "snapshot": "latest"}
    rescore = ReplayJob(config, ReplaySpec(mode="rescore", output="scored.v2", dlq="bad"))
    m = config.models
    assert rescore.fields() == {
        "mode": "rescore", "input": config.topics.raw, "output": "scored.v2", "rejected": "", "dlq": "bad",
        "from": "earliest", "to": "latest", "askllm": m.askllm, "embedder": m.embedder, "max_tokens": m.max_tokens,
        "variant": m.variant}
    assert route.job_id.startswith("replay-") and route.group == f"{config.kafka.group_prefix}.replay.{route.job_id}"


@pytest.mark.parametrize("spec, message", [
    (ReplaySpec(), "--output: required with --mode route"),
    (ReplaySpec(mode="rescore", output="o", seed=1), "rescore writes scored records"),
    (ReplaySpec(output="o", start="200", end="100"), "after --to"),
    (ReplaySpec(output="o", input="o"), "is the input topic"),
])
def test_a_bad_job_fails_before_kafka_is_touched(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        ReplayJob(loaded_config(tmp_path, "kafka.bootstrap_servers=127.0.0.1:1"), spec)


@pytest.mark.kafka
def test_preparing_a_job_on_the_broker_leaves_the_config_unchanged(bootstrap, replay_config):
    path, topics, snapshots = replay_config()
    records = scored_records(60, seed=12)
    build_snapshot(records, snapshots)
    produce_scored(bootstrap, topics["scored"], records)
    config = load_config(path, env={})
    before = dataclasses.asdict(config)

    job = ReplayJob(with_batch_docs(config, 20), ReplaySpec(output=topics["accepted"] + ".prepared", batch_docs=20))
    assert job.prepare()

    assert dataclasses.asdict(config) == before
    assert job.state.total == len(records) and job.state.snapshot_id == job.snapshot.snapshot_id
    assert job.transform.stage == "replay" and job.transform.accepted_topic == topics["accepted"] + ".prepared"
