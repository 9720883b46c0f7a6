"""DLQ entries a stage produces for a record it cannot handle: the original bytes and reason headers."""

from __future__ import annotations

from dataclasses import dataclass

from streamfilter.config import Config
from streamfilter.errors import InvalidDocument
from streamfilter.kafka_clients import SizeLimits
from streamfilter.kafka_loop import Outputs


@dataclass(frozen=True)
class DlqTarget:
    """Where a stage's DLQ entries go and how: the topic, the most of an original value an entry copies,
    and the value format (`output.format`)."""

    topic: str
    value_bytes: int
    format: str = "msgpack"

    @classmethod
    def of(cls, config: Config, topic: str | None = None) -> "DlqTarget":
        """The configured DLQ (`topics.dlq`, or `topic`: a replay's --dlq)."""
        return cls(topic or config.topics.dlq, SizeLimits.of(config).dlq_value_bytes, config.output.format)


def add_dlq_output(outputs: Outputs, dlq: DlqTarget, stage: str, exc: InvalidDocument, record) -> None:
    """Append the DLQ entry for `record` (original bytes up to the cap, reason headers); counted on commit."""
    outputs.add_dlq(dlq.topic, stage, exc, record, dlq.value_bytes, fmt=dlq.format)
