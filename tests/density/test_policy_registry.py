"""The policy registry: one list of policies, read by the configuration, the CLI and replay.

A policy defined here (a subclass of `Policy` with a `name`) is accepted everywhere a
built-in one is, without touching any other file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import streamfilter
from streamfilter.commands import build_parser
from streamfilter.config import build_policy as configured_policy
from streamfilter.config import load_config
from streamfilter.density.state import SketchState
from streamfilter.errors import ConfigError
from streamfilter.policies import (
    Policy,
    PreparedPolicy,
    build_policy,
    policy_class,
    policy_names,
    unregister_policy,
)
from streamfilter.records import Document, ScoredRecord

BUILT_IN = ("askllm", "density", "random", "askllm+density", "perplexity", "density-top", "density-bottom")


@pytest.fixture
def keep_everything():
    """A policy that needs no snapshot and keeps every document."""

    class KeepEverythingPolicy(Policy):
        name = "keep-everything"
        needs_snapshot = False

        def keep_probabilities(self, prepared, askllm, density, perplexity):
            return np.ones(askllm.shape[0])

    yield KeepEverythingPolicy
    unregister_policy("keep-everything")


@pytest.fixture
def gated_random():
    """A policy with a quality gate: the top `quality_keep` by P(yes), then a fair coin for the rest of the cut."""

    class GatedRandomPolicy(Policy):
        name = "askllm+random"
        uses_quality = True
        has_quality_gate = True

        @property
        def quality_fraction(self):
            return self.quality_keep

        def prepare(self, snapshot):
            snapshot = self._require(snapshot)
            return PreparedPolicy(self, snapshot.snapshot_id, quality_threshold=self.quality_threshold(snapshot))

        def keep_probabilities(self, prepared, askllm, density, perplexity):
            return np.where(askllm >= prepared.quality_threshold, self.keep_rate / self.quality_keep, 0.0)

    yield GatedRandomPolicy
    unregister_policy("askllm+random")


def _help(command: str) -> str:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return " ".join(subparsers.choices[command].format_help().split())


def _scored(n: int, dim: int = 4) -> list[ScoredRecord]:
    rng = np.random.default_rng(0)
    return [ScoredRecord(Document(id=f"d{i}", text="t"), float(rng.random()), np.zeros(dim, np.float16), "a", "e",
                         ("crawl.scored", 0, i)) for i in range(n)]


def test_todays_policies_are_registered_in_order():
    assert policy_names() == BUILT_IN
    assert all(policy_class(name).name == name for name in BUILT_IN)
    assert [name for name in BUILT_IN if policy_class(name).has_quality_gate] == ["askllm+density"]
    assert [name for name in BUILT_IN if not policy_class(name).needs_snapshot] == ["random"]


def test_replay_and_compare_help_list_every_policy(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap density-bottom at its hyphen
    replay, compare = _help("replay"), _help("compare")
    assert f"--policy POLICY policy name (policy.name): {', '.join(BUILT_IN)}" in replay
    assert "perplexity" in replay
    assert ", ".join(BUILT_IN) in compare


def test_a_new_policy_is_accepted_everywhere(keep_everything, monkeypatch):
    assert policy_names() == (*BUILT_IN, "keep-everything")
    policy = build_policy("keep-everything", 0.4, seed=3)
    assert isinstance(policy, keep_everything) and policy.key == "keep-everything:keep=0.4:quality=None"
    decisions = policy.prepare(None).decide(["a", "b"], np.array([0.1, 0.9]), None)
    assert [(d.keep, d.probability, d.policy, d.snapshot_id) for d in decisions] == [
        (True, 1.0, "keep-everything", ""), (True, 1.0, "keep-everything", "")]

    # the configuration validates against the registry; policy.quality_keep is not passed to a policy without a gate
    config = load_config(overrides=["policy.name=keep-everything", "policy.keep_rate=0.4"], env={})
    assert configured_policy(config) == policy.__class__(keep_rate=0.4, quality_keep=None, seed=0)
    with pytest.raises(ConfigError, match="policy.name: unknown policy 'best'; valid policies are .*keep-everything"):
        load_config(overrides=["policy.name=best"], env={})
    with pytest.raises(ConfigError, match=re.escape(", ".join((*BUILT_IN, "keep-everything")))):
        build_policy("best", 0.4)

    monkeypatch.setenv("COLUMNS", "1000")
    assert f"{', '.join(BUILT_IN)}, keep-everything" in _help("replay")


def test_a_policy_that_needs_no_snapshot_routes_without_one(keep_everything, tmp_path):
    from streamfilter.stages import RouteTransform

    config = load_config(overrides=["policy.name=keep-everything", f"sketch.snapshot_dir={tmp_path / 'none'}"],
                         env={})
    route = RouteTransform.from_config(config)
    assert not route.needs_snapshot
    route.wait_for_snapshot()  # returns at once: the store is empty and nothing is waited for
    decisions = route.decisions(_scored(5))
    assert [d.keep for d in decisions] == [True] * 5 and {d.snapshot_id for d in decisions} == {""}


def test_a_new_quality_gate_takes_quality_keep_from_config_and_specs(gated_random):
    with pytest.raises(ConfigError, match="only the askllm\\+density, askllm\\+random policies have a quality gate"):
        build_policy("density", 0.5, quality_keep=0.7)
    assert build_policy("askllm+random", 0.25).quality_keep == 0.5  # sqrt(keep_rate), like askllm+density
    with pytest.raises(ConfigError, match="quality_keep: the quality gate keeps 0.1, less than keep_rate 0.25"):
        build_policy("askllm+random", 0.25, quality_keep=0.1)

    config = load_config(overrides=["policy.name=askllm+random", "policy.keep_rate=0.3", "policy.quality_keep=0.6"],
                         env={})
    policy = configured_policy(config)
    assert (policy.name, policy.keep_rate, policy.quality_keep) == ("askllm+random", 0.3, 0.6)

    from streamfilter.replay.decide import parse_policy_spec

    assert parse_policy_spec("askllm+random", config)[1].quality_keep == 0.6  # the configured gate
    assert parse_policy_spec("askllm+random:quality=0.8", config)[1].quality_keep == 0.8
    assert parse_policy_spec("density", config)[1].quality_keep is None

    rng = np.random.default_rng(2)
    n = 4000
    state = SketchState.create(4, rows=4, buckets=16, k=1, reservoir_size=64)
    askllm = rng.random(n)
    state.on_batch([f"d{i}" for i in range(n)], rng.standard_normal((n, 4)).astype(np.float32), askllm,
                   [("t", 0, i) for i in range(n)])
    decisions = policy.prepare(state.snapshot()).decide([f"d{i}" for i in range(n)], askllm, None)
    kept = np.array([d.keep for d in decisions])
    assert kept.mean() == pytest.approx(0.3, abs=0.03)
    assert askllm[kept].min() >= np.quantile(askllm, 0.4 - 0.02)


def test_a_second_class_cannot_take_a_registered_name():
    with pytest.raises(ValueError, match="'density' is already registered by InversePropensityPolicy"):
        class Impostor(Policy):  # noqa: F841
            name = "density"
    assert policy_class("density").__name__ == "InversePropensityPolicy"


def test_no_code_outside_policies_compares_policy_names():
    """Policies declare what they need; nothing else branches on a policy's name."""
    root = Path(streamfilter.__file__).parent
    names = "|".join(re.escape(n) for n in ("random", "density", "askllm+density", "density-top", "density-bottom"))
    patterns = [re.compile(r"\bpolic\w*(\.\w+)*\.name\s*(==|!=|in\b|not\s+in\b)"),
                re.compile(rf"(==|!=)\s*[\"']({names})[\"']|[\"']({names})[\"']\s*(==|!=)")]
    found = [f"{path.relative_to(root)}:{number}: {line.strip()}"
             for path in sorted(root.rglob("*.py")) if path != root / "policies.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if any(p.search(line) for p in patterns)]
    assert found == []
