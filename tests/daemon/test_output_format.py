"""The output topics as an interface: JSON or msgpack values a consumer without streamfilter reads
from the README's schema, provenance on every record, input headers carried through."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.request

import msgpack
import pytest

from kafka_helpers import OutputCollector, produce
from .conftest import malformed_values, sample_documents

pytestmark = pytest.mark.kafka

# A consumer of the output topics that knows only the README's "Output records" schema: it must not
# (and cannot: streamfilter is blocked) use streamfilter's own code. Reads [format, [[value_b64,
# [[header, value_b64], ...]], ...]] as JSON on stdin; prints one normalised JSON object per record.
READER = r'''
import base64, json, sys
sys.modules["streamfilter"] = None  # an ImportError if anything below reaches for streamfilter
import msgpack

fmt, records = json.load(sys.stdin)
for value_b64, headers in records:
    value = base64.b64decode(value_b64)
    h = {k: base64.b64decode(v).decode() for k, v in headers}
    if "sf-dlq-reason" in h:  # a DLQ entry
        if fmt == "json":
            obj = json.loads(value)
            out = {"kind": obj["kind"], "reason": obj["reason"], "original": obj["original_base64"]}
        else:
            out = {"kind": "dlq", "reason": h["sf-dlq-reason"], "original": base64.b64encode(value).decode()}
    elif fmt == "json":
        obj = json.loads(value)
        out = {"kind": obj["kind"], "schema_version": obj["schema_version"], "id": obj["id"], "text": obj["text"],
               "decision": obj["decision"], "askllm": obj["scores"]["askllm"],
               "probability": obj["scores"]["probability"], "policy": obj["policy"]["name"],
               "keep_rate": obj["policy"]["keep_rate"], "seed": obj["policy"]["seed"], "snapshot": obj["snapshot"],
               "job": obj["job"], "source_topic": obj["source"]["topic"]}
    else:
        doc = msgpack.unpackb(value, raw=False)
        out = {"kind": "decision", "schema_version": None, "id": doc["id"], "text": doc["text"],
               "decision": h["sf-decision"], "askllm": float(h["sf-askllm"]),
               "probability": float(h["sf-probability"]), "policy": h["sf-policy"],
               "keep_rate": float(h["sf-keep-rate"]), "seed": int(h["sf-policy-seed"]), "snapshot": h["sf-snapshot"],
               "job": h["sf-job"], "source_topic": h["sf-source"].rsplit("/", 2)[0]}
    out["carried"] = h.get("crawl-run")
    print(json.dumps(out))
'''


def read_without_streamfilter(fmt: str, records) -> list[dict]:
    payload = [fmt, [[base64.b64encode(r.value).decode(), [[k, base64.b64encode(v).decode()] for k, v in r.headers]]
                     for r in records]]
    result = subprocess.run([sys.executable, "-c", READER], input=json.dumps(payload), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_outputs_decode_from_the_documented_schema_with_provenance_and_input_headers(
        fmt, bootstrap, daemon_config, start_daemon):
    config, topics, _ = daemon_config(output={"format": fmt}, route={"min_snapshot_docs": 1},
                                      policy={"seed": 5})
    docs = sample_documents(90, seed=21)
    bad = malformed_values(6)
    # an input header to carry through, and one that tries to pass for a decision (never carried)
    headers = [("crawl-run", b"2024-05"), ("sf-decision", b"accept")]
    produce(bootstrap, topics["raw"], [msgpack.packb(d) for d in docs] + bad, headers=headers)
    outputs = [topics["accepted"], topics["rejected"], topics["dlq"]]
    collector = OutputCollector(bootstrap, outputs)
    daemon = start_daemon(config)
    collector.wait_total(len(docs) + len(bad), timeout_s=240, alive=daemon.alive)
    port = int([line for line in config.read_text().splitlines() if line.startswith("metrics_port")][0].split("=")[1])
    metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert daemon.terminate() == 0, daemon.log()[-3000:]
    collector.close()

    decisions = read_without_streamfilter(fmt, collector.records[topics["accepted"]]
                                          + collector.records[topics["rejected"]])
    by_id = {d["id"]: d for d in decisions}
    assert sorted(by_id) == sorted(d["id"] for d in docs) and len(decisions) == len(docs)
    for d in decisions:
        assert d["text"] == next(doc["text"] for doc in docs if doc["id"] == d["id"])
        assert d["decision"] in ("accept", "reject") and 0 <= d["askllm"] <= 1 and 0 <= d["probability"] <= 1
        assert (d["policy"], d["keep_rate"], d["seed"], d["job"]) == ("askllm+density", 0.3, 5, "live")
        assert d["snapshot"] and d["source_topic"] == topics["raw"]
        assert d["carried"] == "2024-05"
        assert d["schema_version"] == (1 if fmt == "json" else None)
    for r in collector.records[topics["accepted"]] + collector.records[topics["rejected"]]:
        sf_decisions = [v for k, v in r.headers if k == "sf-decision"]
        assert len(sf_decisions) == 1 and sf_decisions[0] in (b"accept", b"reject")
    accepted_ids = {json.loads(r.value)["id"] if fmt == "json" else msgpack.unpackb(r.value)["id"]
                    for r in collector.records[topics["accepted"]]}
    assert {d["id"] for d in decisions if d["decision"] == "accept"} == accepted_ids

    dlq = read_without_streamfilter(fmt, collector.records[topics["dlq"]])
    assert len(dlq) == len(bad) and {d["kind"] for d in dlq} == {"dlq"}
    assert sorted(base64.b64decode(d["original"]) for d in dlq) == sorted(bad)
    if fmt == "json":  # every value is one JSON object: a plain json.loads reads the whole topic
        for r in collector.records[topics["dlq"]]:
            assert json.loads(r.value)["reason"] == dict(r.headers)["sf-dlq-reason"].decode()

    # produce-to-decision latency is measured from the raw record's timestamp
    count = [line for line in metrics_text.splitlines()
             if line.startswith('streamfilter_decision_latency_seconds_count{stage="route"}')]
    assert count and float(count[0].split()[-1]) == len(docs)


def test_kcat_reads_the_json_output(bootstrap, daemon_config, start_daemon):
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.skip("kcat is not installed (make test installs it)")
    config, topics, _ = daemon_config(output={"format": "json"}, route={"min_snapshot_docs": 1})
    docs = sample_documents(40, seed=22)
    produce(bootstrap, topics["raw"], [msgpack.packb(d) for d in docs])
    collector = OutputCollector(bootstrap, [topics["accepted"], topics["rejected"]])
    daemon = start_daemon(config)
    collector.wait_total(len(docs), timeout_s=240, alive=daemon.alive)
    assert daemon.terminate() == 0, daemon.log()[-3000:]
    collector.close()
    ids = []
    for topic in (topics["accepted"], topics["rejected"]):
        result = subprocess.run([kcat, "-C", "-b", bootstrap, "-t", topic, "-X", "isolation.level=read_committed",
                                 "-e", "-q", "-J"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            envelope = json.loads(line)  # kcat's own JSON envelope, the value as a string inside it
            value = json.loads(envelope["payload"])
            assert value["schema_version"] == 1 and value["kind"] == "decision"
            ids.append(value["id"])
    assert sorted(ids) == sorted(d["id"] for d in docs)
