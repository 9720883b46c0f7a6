"""Recovery time of `streamfilter run` after a broker restart, a broker SIGKILL and a daemon SIGKILL.

A private broker and one `streamfilter run` process (the tiny offline test models, policy
`random`, the default Kafka timeouts: session 10 s, transaction 30 s) while documents arrive
at a steady rate. For each fault the bench scrapes the daemon's /metrics every 100 ms and
reports, per stage, how long after the broker answered again (or the daemon was restarted)
that stage's output counter first moved: score → scored, sketch → counted, route →
accepted + rejected. The goals: ≤ 30 s after a broker restart, ≤ session timeout + 10 s after
a SIGKILL of the daemon.

    .venv/bin/python bench/recovery.py [--rate 40] [--outage-s 10] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamfilter.broker import KafkaBroker, free_port  # noqa: E402
from streamfilter.corpus import wiki_documents  # noqa: E402

OUTPUTS = {"score": ("scored",), "sketch": ("counted",), "route": ("accepted", "rejected")}
SAMPLE = re.compile(r'^streamfilter_documents_total\{outcome="(\w+)",stage="(\w+)"\} ([0-9.e+]+)$', re.M)


def progress(port: int) -> dict[str, float] | None:
    """Documents out per stage, from the daemon's /metrics (None while it does not answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    out = {stage: 0.0 for stage in OUTPUTS}
    for outcome, stage, value in SAMPLE.findall(text):
        if stage in OUTPUTS and outcome in OUTPUTS[stage]:
            out[stage] += float(value)
    return out


def time_to_progress(port: int, since: float, timeout_s: float = 180) -> dict[str, float]:
    """Seconds from `since` (monotonic) until each stage's output counter moves past its value at `since`."""
    base, found = None, {}
    while time.monotonic() - since < timeout_s and len(found) < len(OUTPUTS):
        now = progress(port)
        if now is not None:
            if base is None:
                base = now
            for stage, value in now.items():
                if stage not in found and value > base[stage]:
                    found[stage] = time.monotonic() - since
        time.sleep(0.1)
    return {stage: found.get(stage, float("inf")) for stage in OUTPUTS}


class Feeder(threading.Thread):
    """Produces `rate` documents a second until stopped; kafka-python buffers while the broker is away."""

    def __init__(self, bootstrap: str, topic: str, rate: float):
        super().__init__(daemon=True)
        from kafka import KafkaProducer

        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, retries=1_000_000,
                                      delivery_timeout_ms=600_000, request_timeout_ms=5_000, max_block_ms=600_000)
        self.topic, self.rate, self.stop = topic, rate, threading.Event()
        self.docs = wiki_documents()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            doc = self.docs[i % len(self.docs)]
            self.producer.send(self.topic, json.dumps({"id": f"r{i}", "text": doc.text}).encode())
            i += 1
            self.stop.wait(1 / self.rate)
        self.producer.flush(timeout=30)
        self.producer.close(timeout=5)


def write_config(path: Path, bootstrap: str, prefix: str, models, snapshots: Path, port: int) -> dict:
    topics = {k: f"{prefix}.{k}" for k in ("raw", "scored", "accepted", "rejected", "dlq")}
    sections = {
        "kafka": {"bootstrap_servers": bootstrap, "instance_id": "recovery", "group_prefix": prefix},
        "topics": {**topics, "partitions": 3},
        "models": {"askllm": str(models.askllm), "embedder": str(models.sentence_t5), "max_tokens": 128,
                   "variant": "fp32"},
        "batch": {"max_batch_docs": 64, "max_wait_ms": 200},
        "sketch": {"rows": 100, "buckets": 2000, "snapshot_dir": str(snapshots), "snapshot_interval_s": 1.0},
        "policy": {"name": "random", "keep_rate": 0.5},
        "daemon": {"metrics_port": port},
    }
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                            for s, values in sections.items()))
    return topics


def start_daemon(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "streamfilter", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def wait_ready(port: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the daemon was not ready within {timeout_s:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=40, help="documents per second fed meanwhile")
    parser.add_argument("--outage-s", type=float, default=10, help="how long the broker stays away")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    from streamfilter.models import ensure_test_models

    models = ensure_test_models()
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    broker = KafkaBroker(work / "broker", port=free_port())
    broker.start()
    port = free_port()
    config = work / "streamfilter.toml"
    topics = write_config(config, broker.bootstrap, f"recovery-{uuid.uuid4().hex[:6]}", models,
                          work / "snapshots", port)
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=3, replication_factor=1) for t in topics.values()])
    admin.close()
    feeder = Feeder(broker.bootstrap, topics["raw"], args.rate)
    feeder.start()
    daemon = start_daemon(config, work / "daemon.log")
    results: list[tuple[str, dict[str, float]]] = []
    try:
        wait_ready(port)
        time_to_progress(port, time.monotonic())  # steady state: every stage has produced
        for _ in range(args.rounds):
            broker.stop()
            time.sleep(args.outage_s)
            broker.start()
            results.append(("broker stopped (SIGTERM) and restarted", time_to_progress(port, time.monotonic())))
            os.kill(broker.status().pid, signal.SIGKILL)
            time.sleep(args.outage_s)
            broker.start()
            results.append(("broker SIGKILLed and restarted", time_to_progress(port, time.monotonic())))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(30)
            daemon = start_daemon(config, work / "daemon.log")
            results.append(("daemon SIGKILLed and restarted", time_to_progress(port, time.monotonic())))
    finally:
        feeder.stop.set()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        feeder.join(60)
        broker.stop()
    print(f"streamfilter run, {args.rate:.0f} docs/s fed, broker away {args.outage_s:.0f}s, session timeout 10 s, "
          f"transaction timeout 30 s (log: {work / 'daemon.log'})")
    print(f"  {'fault':42s} " + " ".join(f"{s:>7s}" for s in OUTPUTS) + "   (seconds to the first progress)")
    for name, times in results:
        print(f"  {name:42s} " + " ".join(f"{times[s]:7.1f}" for s in OUTPUTS))


if __name__ == "__main__":
    main()
