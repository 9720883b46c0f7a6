"""DLQ entries a stage produces for a record it cannot handle: the original bytes and reason headers."""

from __future__ import annotations

from streamfilter import metrics
from streamfilter.config import Config
from streamfilter.errors import InvalidDocument
from streamfilter.kafka_loop import Output, Outputs
from streamfilter.records import dlq_headers


def add_dlq_output(outputs: Outputs, config: Config, stage: str, exc: InvalidDocument, record) -> None:
    """Append the DLQ entry for `record` (original bytes, reason headers) and count it on commit."""
    outputs.count(metrics.DLQ, (stage, exc.reason))
    outputs.count(metrics.DOCUMENTS, (stage, "dlq"))
    outputs.append(Output(config.topics.dlq, record.value if record.value is not None else b"", key=record.key,
                          headers=dlq_headers(exc, stage, record.topic, record.partition, record.offset)))
