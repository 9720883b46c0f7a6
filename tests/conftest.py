"""Test harness: one real Apache Kafka broker per test session, started on first use.

Tests that need Kafka ask for the `bootstrap` fixture (and are marked `kafka`); the
broker starts once, on a free port in a temporary folder, and is always stopped at the
end. Set SFTEST_BOOTSTRAP=host:port to run against a broker you started
yourself (`streamfilter broker start`) and skip the start-up.

Every test gets unique topic and group names (`names`), so tests never see each
other's data. Consumers made with `consumer_config` use short group session timeouts
(the broker allows them: group.min.session.timeout.ms=500), so a join takes about a second.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest

from streamfilter.broker import KafkaBroker, free_port

GROUP_TIMEOUTS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    external = os.environ.get("SFTEST_BOOTSTRAP")
    if external:
        yield external
        return
    broker = KafkaBroker(data_dir=tmp_path_factory.mktemp("kafka"), port=free_port())
    try:
        broker.start()
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def bootstrap(kafka_broker) -> str:
    return kafka_broker


@pytest.fixture(scope="session")
def test_models():
    """The small offline models (built once into a cache) for tests that run the score stage."""
    from streamfilter.models import ensure_test_models

    return ensure_test_models()


class Names:
    """Unique topic and group names for one test."""

    def __init__(self, test_name: str):
        base = re.sub(r"[^A-Za-z0-9._-]", "-", test_name)[:80]
        self.prefix = f"{base}-{uuid.uuid4().hex[:8]}"

    def topic(self, suffix: str = "t") -> str:
        return f"{self.prefix}.{suffix}"

    def group(self, suffix: str = "g") -> str:
        return f"{self.prefix}.{suffix}"


@pytest.fixture
def names(request) -> Names:
    return Names(request.node.name)


@pytest.fixture
def create_topics(bootstrap):
    """Create topics (name -> partitions) and wait until every partition has a leader."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)

    def create(topics: dict[str, int]) -> None:
        admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1) for t, n in topics.items()])

    yield create
    admin.close()


@pytest.fixture
def consumer_config(bootstrap):
    def config(group: str | None = None, **overrides) -> dict:
        cfg = {
            "bootstrap_servers": bootstrap,
            "group_id": group,
            "auto_offset_reset": "earliest",
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "consumer_timeout_ms": 10_000,
            **GROUP_TIMEOUTS,
        }
        cfg.update(overrides)
        return cfg

    return config
