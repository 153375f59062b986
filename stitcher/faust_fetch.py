"""A Faust app class whose Kafka consumer does not sit in a fetch for 1.5 s.

Faust 0.15's aiokafka driver creates its consumer with a hard-coded `fetch_max_wait_ms=1500`.
A broker that answers a waiting fetch as soon as data arrives makes that harmless, but one that
holds the fetch until the wait is over adds it to every frame's delivery. Tansu does the latter
(measured here, 40 frames/s over 4 partitions, produce → consume: p50 0.38 s, p95 0.72 s with
1500 ms; p50 0.03 s, p95 0.05 s with 100 ms), and that delay lands on every exported span. The
consumer's wait is therefore set from `stitch.fetch_max_wait_ms`; the price of a shorter wait
is an idle fetch round trip per wait interval, nothing on a busy topic.

Only the worker consumer changes; the rest is Faust's own driver, subclassed at the two places
it names its classes (`Transport.Consumer`, `Consumer._new_consumer_thread`).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver


def app_class(fetch_max_wait_ms: int) -> type[faust.App]:
    """A `faust.App` subclass whose worker consumer waits at most `fetch_max_wait_ms` per fetch."""

    class _Thread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # read by AIOKafkaConsumer.start() when it builds its Fetcher (aiokafka 0.14)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms
            return consumer

    class _Consumer(driver.Consumer):
        def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
            return _Thread(self, loop=self.loop, beacon=self.beacon)

    class _Transport(driver.Transport):
        Consumer = _Consumer

    class _App(faust.App):
        def _new_transport(self) -> Any:
            return _Transport(self.conf.broker_consumer, self)

    return _App
