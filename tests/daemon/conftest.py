"""Helpers for running the real daemon (`python -m streamfilter run`) against the test broker.

The plain Kafka helpers (producing, reading committed output, the config file) are in
`tests/kafka_helpers.py`, shared with the replay tests; the `test_models` fixture is `tests/conftest.py`'s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from kafka_helpers import MAX_RECORD_BYTES, TOPIC_KINDS, stream_config, write_config
from streamfilter.broker import free_port
from streamfilter.corpus import junk_documents, wiki_documents

@dataclass
class Daemon:
    """One `streamfilter run|score|sketch|route` process with its own config file."""

    config_path: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, command: str = "run", *extra: str) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "streamfilter", "--log-level", "INFO", command,
                                      "--config", str(self.config_path), *extra],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, *stages: str, timeout_s: float = 300) -> None:
        """Wait until /ready reports `stages` ready (models loaded, partitions assigned), so a
        test's own timeouts start when the daemon works, not while a loaded machine starts it."""
        import tomllib
        import urllib.error
        import urllib.request

        port = tomllib.loads(self.config_path.read_text())["daemon"]["metrics_port"]
        deadline = time.monotonic() + timeout_s
        body = ""
        while time.monotonic() < deadline:
            assert self.alive(), self.log()[-3000:]
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).read().decode()
            except urllib.error.HTTPError as exc:
                body = exc.read().decode()
            except OSError:
                body = ""
            if all(f"{stage} ready" in body for stage in stages):
                return
            time.sleep(0.3)
        raise AssertionError(f"daemon not ready within {timeout_s:.0f}s: {body!r}\n{self.log()[-2000:]}")


@pytest.fixture
def daemon_config(tmp_path, names, bootstrap, test_models):
    """Write a config for one test and create its topics; returns (config path, topics dict, snapshot dir)."""

    def make(bootstrap_servers: str = bootstrap, **sections) -> tuple[Path, dict, Path]:
        from kafka.admin import KafkaAdminClient, NewTopic

        topics = {k: names.topic(k) for k in TOPIC_KINDS}
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
        admin.create_topics([NewTopic(t, num_partitions=3, replication_factor=1,
                                      topic_configs={"max.message.bytes": str(MAX_RECORD_BYTES)})
                             for t in topics.values()])
        admin.close()
        snapshots = tmp_path / "snapshots"
        base = stream_config(bootstrap_servers, names.prefix, topics, partitions=3)
        base["models"] = {"askllm": str(test_models.askllm), "embedder": str(test_models.sentence_t5),
                          "max_tokens": 128, "variant": "fp32", "inference_batch_docs": 32}
        base["batch"] = {"max_batch_docs": 128, "max_wait_ms": 200}
        base["sketch"] = {"rows": 100, "buckets": 2000, "snapshot_dir": str(snapshots), "snapshot_interval_s": 1.0}
        base["daemon"]["metrics_port"] = free_port()
        return write_config(tmp_path / "streamfilter.toml", base, sections), topics, snapshots

    return make


@pytest.fixture
def start_daemon(tmp_path):
    started: list[Daemon] = []

    def start(config_path: Path, command: str = "run", name: str = "daemon", *extra: str) -> Daemon:
        """Start `streamfilter COMMAND --config CONFIG [EXTRA...]`, logging to tmp_path/NAME.log."""
        d = Daemon(config_path, tmp_path / f"{name}.log").start(command, *extra)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.alive():
            d.proc.kill()
            d.proc.wait(30)


@pytest.fixture
def own_broker(tmp_path):
    """A private broker for one test (to stop, kill and restart), stopped at the end."""
    from streamfilter.broker import KafkaBroker

    broker = KafkaBroker(tmp_path / "own-broker", port=free_port())
    broker.start()
    yield broker
    broker.stop()


def sample_documents(n: int, seed: int = 0) -> list[dict]:
    """n documents: about 3/4 Wikipedia summaries, 1/4 generated junk; unique ids."""
    wiki = wiki_documents()
    n_junk = n // 4
    docs = [{"id": f"w{seed}-{i}", "url": f"https://en.wikipedia.org/{i}", "text": wiki[i % len(wiki)].text,
             "lang": "en", "meta": {"topic": wiki[i % len(wiki)].topic}} for i in range(n - n_junk)]
    docs += [{"id": f"j{seed}-{i}", "text": d.text, "meta": {"topic": d.topic}}
             for i, d in enumerate(junk_documents(n_junk, seed=seed))]
    return docs


MALFORMED_KINDS = (
    lambda i: b"not msgpack or json \xff #%d" % i,                          # undecodable
    lambda i: b'{"id": "x%d", "text": ""}' % i,                               # empty_text
    lambda i: b'{"id": "x%d"}' % i,                                           # missing_text
    lambda i: b'{"id": "x%d", "text": 42}' % i,                               # bad_type
    lambda i: msgpack.packb([1, 2, i]),                                       # not_a_map
    lambda i: b'{"id": "x%d", "text": "caf\xe9"}' % i,                        # invalid_utf8 (bytes)
    lambda i: b'{"text": "no id or url %d"}' % i,                             # missing_id
    lambda i: b'{"id": "x%d", "text": "lone \\ud800"}' % i,                   # invalid_utf8 (surrogate)
)


def malformed_values(n: int) -> list[bytes]:
    """n distinct malformed values cycling through every kind of bad input."""
    return [MALFORMED_KINDS[i % len(MALFORMED_KINDS)](i) for i in range(n)]
