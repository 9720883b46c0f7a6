"""The daemon under bad input, a broker that goes away, and a third-party client (kcat)."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kafka_helpers import OutputCollector, produce
from streamfilter.records import REASONS

from .conftest import sample_documents

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def running_daemon(bootstrap, daemon_config, start_daemon):
    config, topics, _ = daemon_config(policy={"name": "random", "keep_rate": 0.5})
    daemon = start_daemon(config)
    daemon.wait_ready("score", "route")
    collector = OutputCollector(bootstrap, [topics["accepted"], topics["rejected"], topics["dlq"]])
    yield daemon, topics, collector
    collector.close()


maps = st.dictionaries(
    st.sampled_from(["id", "url", "text", "lang", "meta", "fetched_at"]),
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.binary(max_size=20)
    | st.lists(st.integers(0, 9), max_size=3) | st.sampled_from(["", "  ", "\t\n"]),
    min_size=0, max_size=4,
).filter(lambda m: not (isinstance(m.get("text"), str) and m["text"].strip()))


def test_fuzzed_values_all_land_in_the_dlq_and_the_daemon_survives(bootstrap, running_daemon):
    daemon, topics, collector = running_daemon
    sent: list[bytes] = []

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.binary(min_size=1, max_size=200).filter(lambda b: b.lstrip()[:1] not in (b"{", b"\x80")
                                                               and not (0x80 <= b[0] <= 0x8f or b[0] in (0xde, 0xdf))),
                    min_size=1, max_size=8),
           st.lists(maps, min_size=1, max_size=8))
    def feed(blobs, bad_maps):
        values = blobs + [msgpack.packb(m, use_bin_type=True) for m in bad_maps]
        produce(bootstrap, topics["raw"], values)
        sent.extend(values)

    feed()
    # one good document at the end proves the daemon is still scoring and routing
    good = {"id": "still-alive", "text": "The daemon keeps going after bad input."}
    produce(bootstrap, topics["raw"], [json.dumps(good).encode()])
    collector.wait_total(len(sent) + 1, timeout_s=180, alive=daemon.alive)
    assert daemon.alive()
    dlq = collector.records[topics["dlq"]]
    assert sorted(r.value for r in dlq) == sorted(sent)
    assert all(dict(r.headers)["sf-dlq-reason"].decode() in REASONS for r in dlq)
    routed = collector.records[topics["accepted"]] + collector.records[topics["rejected"]]
    assert [msgpack.unpackb(r.value)["id"] for r in routed] == ["still-alive"]
    assert daemon.terminate() == 0


def test_kcat_documents_are_filtered_and_kcat_reads_the_accepted_topic(bootstrap, running_daemon):
    assert shutil.which("kcat"), "kcat is a test peer: apt-get install kcat (make test does)"
    daemon, topics, collector = running_daemon
    docs = sample_documents(200, seed=11)
    lines = "".join(json.dumps(d) + "\n" for d in docs)
    subprocess.run(["kcat", "-P", "-b", bootstrap, "-t", topics["raw"]], input=lines.encode(), check=True, timeout=60)
    collector.wait_total(len(docs), timeout_s=180, alive=daemon.alive)
    out = subprocess.run(["kcat", "-C", "-b", bootstrap, "-t", topics["accepted"], "-e", "-q",
                          "-X", "isolation.level=read_committed", "-f", "%k\\n"],
                         capture_output=True, text=True, check=True, timeout=60)
    kcat_ids = sorted(out.stdout.split())
    expected = sorted(msgpack.unpackb(r.value)["id"] for r in collector.records[topics["accepted"]])
    assert kcat_ids == expected and 0 < len(kcat_ids) < len(docs)
    everything = expected + [msgpack.unpackb(r.value)["id"] for r in collector.records[topics["rejected"]]]
    assert sorted(everything) == sorted(d["id"] for d in docs)
    assert daemon.terminate() == 0


def test_broker_stopped_and_restarted_mid_stream_loses_nothing(daemon_config, start_daemon, own_broker):
    broker = own_broker
    config, topics, _ = daemon_config(bootstrap_servers=broker.bootstrap,
                                      policy={"name": "random", "keep_rate": 0.5},
                                      daemon={"retry_backoff_max_s": 2})
    docs = sample_documents(1200, seed=5)
    values = [json.dumps(d).encode() for d in docs]
    produce(broker.bootstrap, topics["raw"], values[:600])
    daemon = start_daemon(config)
    daemon.wait_ready("score", "route")
    collector = OutputCollector(broker.bootstrap, [topics["accepted"], topics["rejected"], topics["dlq"]])
    collector.wait_total(300, timeout_s=180, alive=daemon.alive)  # mid-stream
    collector.close()
    broker.stop()
    time.sleep(8)  # the daemon keeps retrying meanwhile
    assert daemon.alive(), daemon.log()[-3000:]
    broker.start()
    produce(broker.bootstrap, topics["raw"], values[600:])
    collector = OutputCollector(broker.bootstrap, [topics["accepted"], topics["rejected"], topics["dlq"]])
    collector.wait_total(len(docs), timeout_s=240, alive=daemon.alive)
    ids = [msgpack.unpackb(r.value)["id"] for t in ("accepted", "rejected") for r in collector.records[topics[t]]]
    counts = collections.Counter(ids)
    assert sorted(counts) == sorted(d["id"] for d in docs)
    assert max(counts.values()) == 1
    assert daemon.terminate() == 0
    collector.close()
