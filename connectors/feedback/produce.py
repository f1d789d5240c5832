"""Send messages to a Kafka topic and wait until the broker has them all."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from connectors.config import KafkaConfig
from connectors.feedback import kafka_clients


def produce(
    kafka: KafkaConfig,
    messages: Iterable[tuple[bytes | None, bytes | None]],
    *,
    topic: str | None = None,
    max_message_bytes: int = 8 << 20,
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Send (key, value) pairs to `topic` (default: the feedback topic), creating it
    first when [kafka] create_topics is on; return how many the broker acknowledged.

    Raises:
        KafkaError: a message was refused; nothing after it is guaranteed sent.
    """
    topic = topic or kafka.topic
    if kafka.create_topics:
        kafka_clients.ensure_topics(kafka, [topic])
    producer = kafka_clients.producer(
        kafka, max_request_size=max_message_bytes, compression_type="lz4", linger_ms=20
    )
    futures = []
    try:
        for key, value in messages:
            futures.append(producer.send(topic, key=key, value=value))
            if on_sent is not None:
                on_sent(1)
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close(timeout=10)
    return len(futures)
