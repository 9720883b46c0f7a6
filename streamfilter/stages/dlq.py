"""DLQ entries a stage produces for a record it cannot handle: the original bytes and reason headers."""

from __future__ import annotations

from streamfilter.config import Config
from streamfilter.errors import InvalidDocument
from streamfilter.kafka_clients import SizeLimits
from streamfilter.kafka_loop import Outputs


def add_dlq_output(outputs: Outputs, config: Config, stage: str, exc: InvalidDocument, record) -> None:
    """Append the DLQ entry for `record` to `config.topics.dlq` (original bytes up to the DLQ's cap,
    reason headers) and count it on commit."""
    outputs.add_dlq(config.topics.dlq, stage, exc, record, SizeLimits.of(config).dlq_value_bytes,
                    fmt=config.output.format)
