"""The dead-letter topic: frames the stitcher cannot use, with the reason, produced by confluent-kafka.

A dead letter is a `weft.events.v1.DeadLetter` (reason, original bytes, where they came from).
Sending is synchronous (produce + flush): dead letters are rare, and the caller must know the
letter is stored before it lets the consumer commit past the bad frame.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException, Producer

from schemas import weft_events_pb2 as pb
from weft.config import KafkaSettings
from weft.logs import librdkafka_logger

logger = logging.getLogger(__name__)


class DeadLetterError(RuntimeError):
    """A dead letter could not be written to the broker."""


class DeadLetterProducer:
    """Writes DeadLetter records to KafkaSettings.dead_letter_topic, keyed by node when known."""

    def __init__(self, kafka: KafkaSettings, *, timeout_s: float = 10.0) -> None:
        self.topic = kafka.dead_letter_topic
        self._timeout_s = timeout_s
        self._producer = Producer({**kafka.confluent(), "enable.idempotence": True,
                                   "linger.ms": 0, "client.id": "weft-stitch-deadletter",
                                   # its lines through Python logging, thinned (served by poll())
                                   "logger": librdkafka_logger()})
        self.sent = 0

    def send(self, reason: str, payload: bytes, *, source_topic: str = "", partition: int = -1,
             offset: int = -1, node: str = "") -> None:
        """Store one dead letter; raises DeadLetterError when the broker did not take it."""
        letter = pb.DeadLetter(reason=reason, payload=payload, source_topic=source_topic,
                               partition=partition, offset=offset, node=node, ts_ns=time.time_ns())
        errors: list[str] = []

        def on_delivery(err: object, _msg: object) -> None:
            if err is not None:
                errors.append(str(err))

        try:
            self._producer.produce(self.topic, letter.SerializeToString(), node.encode() or None,
                                   on_delivery=on_delivery)
        except (KafkaException, BufferError) as exc:
            raise DeadLetterError(f"cannot produce to {self.topic}: {exc}") from exc
        left = self._producer.flush(self._timeout_s)
        if left or errors:
            raise DeadLetterError(f"dead letter not stored in {self.topic}: "
                                  f"{errors[0] if errors else 'flush timed out'}")
        self.sent += 1
        logger.warning("dead-lettered %s[%d]@%d (%d bytes): %s", source_topic, partition, offset,
                       len(payload), reason)

    def poll(self) -> None:
        """Serve the producer's queued callbacks and log lines (call it every few seconds: a
        producer that sends nothing for a long time still logs its reconnects)."""
        self._producer.poll(0)

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
