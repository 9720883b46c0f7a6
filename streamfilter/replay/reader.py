"""Read a fixed range of a topic without a consumer group (dry-run, comparisons): nothing is committed."""

from __future__ import annotations

from collections.abc import Iterator

from streamfilter.config import Config
from streamfilter.kafka_clients import new_consumer


def read_range(config: Config, topic: str, ranges: dict[int, tuple[int, int]], batch_docs: int,
               consumer=None) -> Iterator[list]:
    """Yield lists of records in [start, end) per partition (read_committed) until every partition is done."""
    from kafka.structs import TopicPartition

    own = consumer is None
    consumer = consumer or new_consumer(config, None)
    try:
        ends = {TopicPartition(topic, p): end for p, (start, end) in ranges.items()}
        consumer.assign(list(ends))
        for p, (start, _) in ranges.items():
            consumer.seek(TopicPartition(topic, p), start)
        while True:
            finished = [tp for tp, end in ends.items() if consumer.position(tp) >= end]
            if finished:
                consumer.pause(*finished)
            if len(finished) == len(ends):
                return
            polled = consumer.poll(timeout_ms=500, max_records=batch_docs)
            records = [r for tp, part in polled.items() for r in part if r.offset < ends[tp]]
            if records:
                yield records
    finally:
        if own:
            consumer.close(autocommit=False)
