"""`streamfilter replay` / `compare` on the real broker, run as a user runs them."""

from __future__ import annotations

import collections
import json
import re
import signal
import time

import msgpack
import pytest
from kafka.admin import KafkaAdminClient

from kafka_helpers import OutputCollector, produce, wait_for
from streamfilter.density.snapshot_store import SnapshotStore

from .conftest import build_snapshot, count_committed, produce_scored, scored_records, start_streamfilter, streamfilter

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DAY_MS = 86_400_000


def ids_of(records) -> list[str]:
    return [msgpack.unpackb(r.value)["id"] for r in records]


def collect(bootstrap: str, topics: list[str], expected: int, timeout_s: float = 60) -> OutputCollector:
    collector = OutputCollector(bootstrap, topics)
    collector.wait_total(expected, timeout_s=timeout_s)
    collector.close()
    return collector


def test_timestamp_range_selects_exactly_the_documents_stamped_in_it(bootstrap, replay_config):
    config, topics, snapshots = replay_config()
    records = scored_records(900, seed=1)
    build_snapshot(records, snapshots)
    base = int(time.time() * 1000) - DAY_MS
    stamps = [base + i * 1000 for i in range(len(records))]  # one document a second
    # A few late arrivals: appended inside the window's offsets, stamped before it (producer clock skew).
    for i in range(400, 460, 7):
        stamps[i] = base + 10_000
    produce_scored(bootstrap, topics["scored"], records, timestamps_ms=stamps)
    lo, hi = base + 300_000, base + 600_000  # [300 s, 600 s)
    out = [topics["accepted"], topics["rejected"]]

    result = streamfilter("replay", "--config", str(config), "--from", f"@{lo}", "--to", f"@{hi}",
                          "--output", out[0], "--rejected-output", out[1], "--progress", "log")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {r.document.id for r, t in zip(records, stamps) if lo <= t < hi}
    assert 250 < len(expected) < 300
    collector = collect(bootstrap, out, len(expected))
    got = ids_of(collector.records[out[0]]) + ids_of(collector.records[out[1]])
    assert len(got) == len(set(got)), "a document was written twice"
    assert set(got) == expected
    assert f"{len(expected)} documents" in result.stdout

    # ISO 8601 times select the same documents (a dry-run reads the same range without writing)
    iso = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t / 1000)) + f".{t % 1000:03d}Z" for t in (lo, hi)]
    dry = streamfilter("replay", "--config", str(config), "--mode", "dry-run", "--from", iso[0],
                       "--to", iso[1], "--show", "0")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"{len(expected)} documents" in dry.stdout


def test_sigkill_mid_replay_resumes_and_writes_each_document_once(bootstrap, replay_config, tmp_path):
    config, topics, snapshots = replay_config()
    records = scored_records(12000, seed=2)
    build_snapshot(records, snapshots)
    produce_scored(bootstrap, topics["scored"], records)
    out = [topics["accepted"], topics["rejected"]]
    command = ["replay", "--config", str(config), "--output", out[0], "--rejected-output", out[1],
               "--batch-docs", "300", "--job-id", "killed", "--progress", "log", "--progress-interval-s", "0.5"]

    collector = OutputCollector(bootstrap, out)
    for kill in range(2):
        proc = start_streamfilter(tmp_path / f"replay-{kill}.log", *command)
        wait_for(lambda: collector.poll(200) >= 2500 * (kill + 1) or proc.poll() is not None, 60, interval_s=0.1,
                 message="the replay to commit some batches")
        assert proc.poll() is None, (tmp_path / f"replay-{kill}.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert collector.total < len(records), "the replay finished before it was killed"
    log = (tmp_path / "replay-0.log").read_text()
    assert "offsets, " in log and "docs/s" in log and "ETA" in log  # progress log lines when not on a terminal

    result = streamfilter(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = re.search(r"resumed at (\d+)/(\d+) offsets", result.stdout)
    assert resumed, result.stdout
    assert 0 < int(resumed[1]) < int(resumed[2]) == len(records)  # where this run began, not where it ended
    collector.wait_total(len(records), timeout_s=60)
    collector.close()
    got = ids_of(collector.records[out[0]]) + ids_of(collector.records[out[1]])
    duplicates = [i for i, c in collections.Counter(got).items() if c > 1]
    assert not duplicates, f"{len(duplicates)} documents written twice, e.g. {duplicates[:3]}"
    assert set(got) == {r.document.id for r in records}

    again = streamfilter(*command)  # the job is done: running it again writes nothing
    assert again.returncode == 0 and "already complete" in again.stdout
    assert count_committed(bootstrap, out) == len(records)


def test_replaying_the_live_route_reproduces_every_decision(bootstrap, replay_config, tmp_path):
    config, topics, snapshots = replay_config(policy={"seed": 7})
    records = scored_records(2000, seed=3)
    path = build_snapshot(records[:1500], snapshots)  # the sketch has seen part of the stream
    produce_scored(bootstrap, topics["scored"], records, transaction_docs=100)  # as the score stage writes
    live_out = [topics["accepted"], topics["rejected"]]

    route = start_streamfilter(tmp_path / "route.log", "route", "--config", str(config))
    try:
        live = OutputCollector(bootstrap, live_out)
        live.wait_total(len(records), timeout_s=90, alive=lambda: route.poll() is None)
        live.close()
    finally:
        route.send_signal(signal.SIGTERM)
        route.wait(30)
    assert live.total == len(records), (tmp_path / "route.log").read_text()[-3000:]

    replay_out = [topics["accepted"] + ".replay", topics["rejected"] + ".replay"]
    snapshot_id = SnapshotStore(snapshots).load(path).snapshot_id
    result = streamfilter("replay", "--config", str(config), "--snapshot", snapshot_id,
                          "--output", replay_out[0], "--rejected-output", replay_out[1])
    assert result.returncode == 0, result.stderr[-3000:]
    replayed = collect(bootstrap, replay_out, len(records))

    def decisions(collector, names):
        out = {}
        for name in names:
            for r in collector.records[name]:
                headers = dict(r.headers)
                out[msgpack.unpackb(r.value)["id"]] = (r.value, headers, headers.pop("sf-job"))
        return out

    before, after = decisions(live, live_out), decisions(replayed, replay_out)
    assert len(before) == len(after) == len(records)
    # the same decisions, told apart by the job that made them
    assert {job for *_, job in before.values()} == {b"live"}
    assert len({job for *_, job in after.values()}) == 1 and b"live" not in {job for *_, job in after.values()}
    before = {doc: (value, headers) for doc, (value, headers, _) in before.items()}
    after = {doc: (value, headers) for doc, (value, headers, _) in after.items()}
    differing = [doc for doc in before if before[doc] != after[doc]]
    assert not differing, f"{len(differing)} decisions differ, e.g. {before[differing[0]]} vs {after[differing[0]]}"
    kept = sum(h["sf-decision"] == b"accept" for _, h in before.values())
    assert {h["sf-keep-rate"] for _, h in before.values()} == {b"0.3"}  # provenance: the policy's parameters
    assert {h["sf-policy-seed"] for _, h in before.values()} == {b"7"}
    assert 0.2 < kept / len(records) < 0.4
    assert {h["sf-snapshot"] for _, h in after.values()} == {snapshot_id.encode()}
    # the range ended in commit markers; the finished job still knows it is finished
    again = streamfilter("replay", "--config", str(config), "--snapshot", snapshot_id,
                         "--output", replay_out[0], "--rejected-output", replay_out[1])
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr


def test_bad_arguments_fail_with_one_line_before_anything_is_produced(bootstrap, replay_config, tmp_path):
    config, topics, snapshots = replay_config()
    records = scored_records(300, seed=4)
    build_snapshot(records, snapshots)
    build_snapshot(records, tmp_path / "other", rows=50)  # another sketch's parameters
    build_snapshot(scored_records(50, dim=16), tmp_path / "narrow")  # another embedding dimension
    produce_scored(bootstrap, topics["scored"], records)
    out = topics["accepted"] + ".bad"
    other = next((tmp_path / "other").iterdir())
    cases = {
        "from > to (offsets)": (["--from", "200", "--to", "100"], "after --to"),
        "from > to (times)": (["--from", "2024-05-02T00:00:00Z", "--to", "2024-05-01T00:00:00Z"], "after --to"),
        "unknown topic": (["--input", "no.such.topic"], "'no.such.topic' does not exist"),
        "other sketch parameters": (["--snapshot", str(other)], "other sketch parameters (rows=50"),
        "other embedding dimension": (["--snapshot", "latest", "--set", f"sketch.snapshot_dir={tmp_path / 'narrow'}"],
                                      "16-dimensional"),
        "unknown policy": (["--policy", "top-k"], "unknown policy 'top-k'"),
    }
    for name, (extra, message) in cases.items():
        result = streamfilter("replay", "--config", str(config), "--output", out, *extra)
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert len(errors) == 1 and errors[0].startswith("streamfilter replay: error: "), (name, result.stderr)
        assert message in errors[0], (name, errors[0])
    compare = streamfilter("compare", "--config", str(config), "askllm", "top-k")
    assert compare.returncode != 0 and compare.stderr.strip().count("\n") == 0
    assert "unknown policy 'top-k'" in compare.stderr

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        assert not [t for t in admin.list_topics() if t.startswith(out)], "a failed replay created its output"
    finally:
        admin.close()


def test_a_replay_into_a_topic_another_job_wrote_is_refused_unless_append(bootstrap, replay_config):
    """Replay outputs could not be told apart: a second replay (or the live route) into the same topic
    mixed two runs' decisions silently."""
    config, topics, snapshots = replay_config()
    records = scored_records(300, seed=8)
    build_snapshot(records, snapshots)
    produce_scored(bootstrap, topics["scored"], records)
    out = topics["accepted"] + ".replayed"
    first = streamfilter("replay", "--config", str(config), "--output", out, "--job-id", "first")
    assert first.returncode == 0, first.stderr[-3000:]
    written = count_committed(bootstrap, [out])
    assert written > 0

    second = streamfilter("replay", "--config", str(config), "--output", out, "--job-id", "second",
                          "--keep-rate", "0.5")
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert second.returncode != 0 and len(errors) == 1, second.stderr[-3000:]
    assert f"{out} already holds records from job 'first'" in errors[0] and "--append" in errors[0]
    assert count_committed(bootstrap, [out]) == written  # refused before producing anything

    appended = streamfilter("replay", "--config", str(config), "--output", out, "--job-id", "second",
                            "--keep-rate", "0.5", "--append")
    assert appended.returncode == 0, appended.stderr[-3000:]
    collector = collect(bootstrap, [out], written + 1)
    jobs = collections.Counter(dict(r.headers)["sf-job"] for r in collector.records[out])
    assert set(jobs) == {b"first", b"second"} and jobs[b"first"] == written

    # the live route's output is another writer too
    live = streamfilter("replay", "--config", str(config), "--output", topics["accepted"], "--job-id", "third")
    assert live.returncode == 0, live.stderr[-3000:]  # empty so far: nothing to refuse
    produce(bootstrap, topics["rejected"], [b"x"], headers=[("sf-job", b"live")])
    refused = streamfilter("replay", "--config", str(config), "--output", topics["rejected"], "--job-id", "fourth")
    assert refused.returncode != 0 and "the live route" in refused.stderr, refused.stderr[-3000:]


def test_a_route_replay_of_a_topic_without_scored_records_fails_before_producing(bootstrap, replay_config):
    """Observed: `replay --mode route` over a raw topic sent every record to the DLQ and exited 0."""
    config, topics, snapshots = replay_config()
    build_snapshot(scored_records(100, seed=9), snapshots)
    produce(bootstrap, topics["raw"], [msgpack.packb({"id": f"r{i}", "text": f"raw document {i}"}) for i in range(60)])
    out = topics["accepted"] + ".from-raw"
    for policy in ("askllm+density", "random"):
        result = streamfilter("replay", "--config", str(config), "--input", topics["raw"], "--output", out,
                              "--policy", policy)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
        assert f"{topics['raw']} does not hold scored records" in errors[0] and "--mode rescore" in errors[0]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        assert not [t for t in admin.list_topics() if t.startswith(out)], "the refused replay created its output"
    finally:
        admin.close()


def test_compare_reports_keep_rates_overlap_scores_and_topic_shares(bootstrap, replay_config, tmp_path):
    config, topics, snapshots = replay_config()
    records = scored_records(3000, seed=5)
    build_snapshot(records, snapshots)
    produce_scored(bootstrap, topics["scored"], records)
    report = tmp_path / "compare.json"

    result = streamfilter("replay", "--config", str(config), "--compare", "random:keep_rate=0.3",
                          "density:keep_rate=0.3", "--json", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    for text in ("keep rate", "Jaccard", "Ask-LLM P(yes)", "density score", "kept share by meta.topic", "delta"):
        assert text in result.stdout, text
    data = json.loads(report.read_text())
    assert data["documents"] == len(records)
    rates = {p["policy"]: p["keep_rate"] for p in data["policies"]}
    assert all(0.25 < r < 0.35 for r in rates.values()), rates
    overlap = data["overlap"][0]
    assert 0 < overlap["jaccard"] < 1 and overlap["both"] + overlap["only_a"] == data["policies"][0]["kept"]
    shares = {row["value"]: row["kept_share"] for row in data["by"]["meta.topic"]}
    # inverse propensity keeps more of the rare topic and less of the common one than random does
    assert shares["delta"][1] > shares["delta"][0] and shares["alpha"][1] < shares["alpha"][0]
    density = data["policies"][1]["density"]
    assert density["kept"]["p50"] < density["rejected"]["p50"]

    dry = streamfilter("replay", "--config", str(config), "--mode", "dry-run", "--show", "3")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.count("\nkeep  ") == 3 and "nothing is written" in dry.stdout


def test_rescore_runs_the_models_into_a_scored_topic(bootstrap, replay_config, test_models):
    from streamfilter.records import decode_scored

    config, topics, _ = replay_config(models={
        "askllm": str(test_models.askllm), "embedder": str(test_models.sentence_t5), "max_tokens": 128,
        "variant": "fp32", "inference_batch_docs": 16})
    good = [{"id": f"r{i}", "text": f"Document number {i} describes the history of a river valley."} for i in range(20)]
    bad = [b"not a document", b'{"id": "e", "text": ""}']
    produce(bootstrap, topics["raw"], [json.dumps(d).encode() for d in good] + bad)
    out = topics["scored"] + ".v2"
    result = streamfilter("replay", "--config", str(config), "--mode", "rescore", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    collector = collect(bootstrap, [out, out + ".dlq"], len(good) + len(bad))
    scored = [decode_scored(r.value) for r in collector.records[out]]
    assert sorted(s.document.id for s in scored) == sorted(d["id"] for d in good)
    assert all(0 <= s.askllm <= 1 and s.embedding.size > 0 for s in scored)
    reasons = sorted(dict(r.headers)["sf-dlq-reason"] for r in collector.records[out + ".dlq"])
    assert reasons == [b"empty_text", b"undecodable"]
