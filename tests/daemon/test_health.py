"""Health that tells the truth: /live and /metrics from the first second, /ready with a reason.

A real `streamfilter run` process: against an address where no broker listens (a liveness
probe must not restart a healthy pod during a broker outage, and SIGTERM must still stop it
cleanly), with a metrics port that is taken (fail fast, one line), and against a private
broker that is stopped and started again (readiness turns false, then true).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request

import pytest

from kafka_helpers import produce, wait_for
from streamfilter.broker import free_port

from .conftest import sample_documents

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

STAGES = ("score", "sketch", "route")


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, "") while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def metrics_port(config_path) -> int:
    return tomllib.loads(config_path.read_text())["daemon"]["metrics_port"]


def test_live_and_metrics_answer_at_once_while_no_broker_does(daemon_config, start_daemon):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    shutdown_timeout_s = 10
    config, _, _ = daemon_config(kafka={"bootstrap_servers": dead},
                                 daemon={"shutdown_timeout_s": shutdown_timeout_s, "retry_backoff_max_s": 2})
    port = metrics_port(config)
    started = time.monotonic()
    daemon = start_daemon(config)

    live = (0, "")
    while time.monotonic() - started < 5 and live[0] != 200:
        assert daemon.alive(), daemon.log()[-3000:]
        live = get(port, "/live")
        time.sleep(0.05)
    assert live[0] == 200, f"/live did not answer within 5s of the start: {live}\n{daemon.log()[-3000:]}"
    status, exposition = get(port, "/metrics")
    assert status == 200 and time.monotonic() - started < 5, (status, time.monotonic() - started)
    assert "streamfilter_build_info" in exposition
    status, body = get(port, "/ready")
    assert status == 503, body
    for stage in STAGES:
        assert f"{stage} not ready: waiting for Kafka at {dead}\n" in body, body
        assert f"{stage} ready" not in body, body
    assert 'streamfilter_ready{stage="score"} 0.0' in exposition
    assert 'streamfilter_broker_up{stage="score"} 0.0' in exposition

    time.sleep(4)  # a few connection attempts later: still alive, still answering, still not ready
    assert daemon.alive(), daemon.log()[-3000:]
    assert get(port, "/live")[0] == 200
    status, body = get(port, "/ready")
    assert status == 503 and "waiting for Kafka" in body, body

    stopping = time.monotonic()
    assert daemon.terminate(timeout=shutdown_timeout_s + 5) == 0, daemon.log()[-3000:]
    assert time.monotonic() - stopping < shutdown_timeout_s, "SIGTERM during the Kafka wait took too long"


def test_a_missing_model_folder_fails_before_any_topic_or_group_is_touched(bootstrap, names, daemon_config, tmp_path):
    """Observed: a typo'd model path surfaced only after the topics were created and the group
    joined (and the score stage then failed its model load); the message gave no way forward."""
    from kafka.admin import KafkaAdminClient

    fresh = names.topic("never-created")
    config, _, _ = daemon_config(models={"askllm": str(tmp_path / "no-such-model")}, topics={"scored": fresh})
    result = subprocess.run([sys.executable, "-m", "streamfilter", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("streamfilter run: error: models.askllm: "), result.stderr
    assert "models build-test-models" in errors[0] and "models export askllm" in errors[0]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        assert fresh not in admin.list_topics()
        assert not [g for g in admin.list_groups() if g["group_id"].startswith(names.prefix)]
    finally:
        admin.close()


def test_a_taken_metrics_port_fails_fast_with_one_line(daemon_config, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _, _ = daemon_config(kafka={"bootstrap_servers": dead}, daemon={"metrics_port": port})
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "streamfilter", "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - started < 30, "the bind error must not wait for Kafka"
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"streamfilter run: error: daemon.metrics_port: cannot listen on 127.0.0.1:{port} "
                      "(Address already in use)"], result.stderr


def test_ready_turns_false_while_the_broker_is_stopped_and_true_after_it_restarts(tmp_path, daemon_config,
                                                                                  start_daemon, own_broker):
    broker = own_broker
    config, topics, _ = daemon_config(bootstrap_servers=broker.bootstrap,
                                      policy={"name": "random", "keep_rate": 0.5},
                                      daemon={"retry_backoff_max_s": 2})
    port = metrics_port(config)
    # a few documents, so the sketch writes a snapshot and route becomes ready
    produce(broker.bootstrap, topics["raw"], [json.dumps(d).encode() for d in sample_documents(40, seed=7)])
    daemon = start_daemon(config)
    daemon.wait_ready(*STAGES)
    assert get(port, "/ready")[0] == 200

    broker.stop()
    last: list[tuple[int, str]] = [(0, "")]

    def not_ready() -> bool:
        assert daemon.alive(), daemon.log()[-3000:]
        last[0] = get(port, "/ready")
        return last[0][0] == 503

    wait_for(not_ready, 90, interval_s=0.5, message="/ready to turn 503 while the broker is stopped")
    status, body = last[0]
    assert any(line.startswith(f"{stage} not ready: ") and line.split(": ", 1)[1].strip()
               for stage in STAGES for line in body.splitlines()), body
    assert get(port, "/live")[0] == 200

    broker.start()
    daemon.wait_ready(*STAGES, timeout_s=180)
    assert get(port, "/ready")[0] == 200
    assert daemon.terminate() == 0, daemon.log()[-3000:]


def test_an_output_topic_too_small_for_max_doc_bytes_stops_start_up_with_one_line(bootstrap, names, daemon_config):
    """Start-up compares the topics with the limits the daemon derives from records.max_doc_bytes:
    a DLQ that cannot hold a document's copy would refuse the very records that must go there."""
    from kafka.admin import KafkaAdminClient, NewTopic

    small_dlq = names.topic("small-dlq")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(small_dlq, num_partitions=1, replication_factor=1,
                                  topic_configs={"max.message.bytes": "200000"})])
    admin.close()
    config, _, _ = daemon_config(topics={"dlq": small_dlq}, records={"max_doc_bytes": 500_000})
    done = subprocess.run([sys.executable, "-m", "streamfilter", "score", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "topics.dlq" in errors[0] and small_dlq in errors[0] and "max.message.bytes is 200000" in errors[0]
    assert "records.max_doc_bytes 500000" in errors[0]
