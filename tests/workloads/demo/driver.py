"""The demo's traffic: `python -m tests.workloads.demo.driver CONFIG_JSON`, a closed loop of root requests.

CONFIG_JSON: {"target": "host:port", "entry": service name, "truth": path, "run": id prefix,
"concurrency": C, "requests": total (0 = until `seconds`), "seconds": S, "rps": cap (0 = none)}.
C worker threads, each with its own keep-alive connection (the client pool), send
GET /<entry>/r-<run>-<worker>-<n> and write a root client row to the truth file before each
request. Prints one JSON line {"sent", "ok", "failed", "seconds"} at the end; SIGTERM ends the
loop early and still prints it.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from tests.workloads.demo.truth_log import TruthLog


class Driver:
    def __init__(self, config: dict[str, Any]) -> None:
        self.host, port = config["target"].rsplit(":", 1)
        self.port = int(port)
        self.entry: str = config["entry"]
        self.run_id: str = config["run"]
        self.concurrency = int(config.get("concurrency", 1))
        self.total = int(config.get("requests", 0))
        self.deadline = time.monotonic() + float(config.get("seconds", 3600))
        self.interval = self.concurrency / float(config["rps"]) if config.get("rps") else 0.0
        self.truth = TruthLog(config["truth"], "driver")
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.sent = self.ok = self.failed = 0

    def _claim(self) -> bool:
        """One more request may go out (the total is shared by the workers)."""
        with self._lock:
            done = self.total and self.sent >= self.total
            if done or self.stop.is_set() or time.monotonic() > self.deadline:
                return False
            self.sent += 1
            return True

    def worker(self, index: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        n = 0
        next_at = time.monotonic()
        while self._claim():
            rid = f"{self.run_id}-{index}-{n}"
            n += 1
            self.truth.write(rid, "", "client", "root")
            try:
                conn.request("GET", f"/{self.entry}/r-{rid}", headers={"x-truth-hop": "cross_node"})
                response = conn.getresponse()
                response.read()
                good = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
                good = False
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
            if self.interval:
                next_at += self.interval
                self.stop.wait(max(0.0, next_at - time.monotonic()))
        conn.close()

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(i,)) for i in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"sent": self.sent, "ok": self.ok, "failed": self.failed,
                "seconds": round(time.monotonic() - t0, 3)}


def main() -> None:
    driver = Driver(json.loads(sys.argv[1]))

    def stop(_signum: int, _frame: FrameType | None) -> None:
        driver.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps(driver.run()), flush=True)


if __name__ == "__main__":
    main()
