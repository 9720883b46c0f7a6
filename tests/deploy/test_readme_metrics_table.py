"""deploy/README.md documents every metric the package exports, with its type and labels."""

from __future__ import annotations

import re

from streamfilter import metrics

from .conftest import REPO

EXPOSED_SUFFIX = {"counter": "_total", "info": "_info"}


def documented() -> dict[str, tuple[str, set[str]]]:
    rows = {}
    for line in (REPO / "deploy" / "README.md").read_text().splitlines():
        m = re.match(r"\| `(streamfilter_[a-z0-9_]+)` \| ([a-z ()]+) \|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = (m.group(2).split()[0], set(re.findall(r"`([a-z_]+)`", m.group(3))))
    return rows


def test_every_metric_is_in_the_table_with_its_type_and_labels():
    rows = documented()
    exported = set()
    for collector, _ in metrics.REGISTRY._collector_to_names.items():
        if not hasattr(collector, "_type"):  # prometheus-client's process and platform collectors
            continue
        kind = collector._type
        name = collector._name + EXPOSED_SUFFIX.get(kind, "")
        labels = set(collector._labelnames) or ({"version"} if kind == "info" else set())
        exported.add(name)
        assert name in rows, f"{name} is not documented in deploy/README.md"
        doc_type, doc_labels = rows[name]
        assert doc_type == ("gauge" if kind == "info" else kind), name
        assert doc_labels == labels, f"{name}: documented labels {doc_labels}, exported {labels}"
    assert set(rows) == exported, f"documented but not exported: {set(rows) - exported}"


def test_process_cpu_and_memory_are_exported_and_documented():
    from prometheus_client import generate_latest

    text = generate_latest(metrics.REGISTRY).decode()
    readme = (REPO / "deploy" / "README.md").read_text()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
        assert f"`{name}`" in readme, f"{name} is not documented in deploy/README.md"
