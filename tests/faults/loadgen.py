"""Steady HTTP load for the fault tests: GET `url` at `--rps` over keep-alive connections
(a new connection every `--reconnect` requests, so client ports get reused too), until
SIGTERM; then print "requests=<ok> errors=<failed>" on stdout. Run inside a test node."""

from __future__ import annotations

import argparse
import http.client
import signal
import time
import urllib.parse
from types import FrameType


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--rps", type=float, default=20.0)
    parser.add_argument("--reconnect", type=int, default=20)
    parser.add_argument("--header", action="append", default=[], help="Name: value (repeatable)")
    ns = parser.parse_args()
    url = urllib.parse.urlsplit(ns.url)
    target = url.path + (f"?{url.query}" if url.query else "") or "/"
    headers = dict(h.split(": ", 1) for h in ns.header)
    stop = False

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    ok = failed = 0
    conn: http.client.HTTPConnection | None = None
    interval = 1.0 / ns.rps
    next_at = time.monotonic()
    while not stop:
        if conn is None or (ok + failed) % ns.reconnect == 0:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=5)
        try:
            conn.request("GET", target, headers=headers)
            conn.getresponse().read()
            ok += 1
        except (OSError, http.client.HTTPException):
            failed += 1
            conn.close()
            conn = None
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(f"requests={ok} errors={failed}", flush=True)


if __name__ == "__main__":
    main()
