"""Paced HTTP/1.1 load at a fixed rate on one keep-alive connection; prints latency percentiles (µs).

wrk2 is not available, so this is the fixed-rate generator for the latency figure: requests are
sent on a fixed schedule (not back-to-back), and each latency is measured from its scheduled
send time, so a stall is charged to every request it delays (no coordinated omission).
Usage: python -m tests.workloads.paced_client HOST PORT RATE SECONDS
"""

from __future__ import annotations

import json
import socket
import sys
import time


def read_response(sock: socket.socket, buf: bytearray) -> None:
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(buf) >= end + 4 + length:
                del buf[: end + 4 + length]
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def main() -> None:
    host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = f"GET /paced HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    interval = 1.0 / rate
    latencies: list[float] = []
    buf = bytearray()
    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        scheduled = start + n * interval
        while time.perf_counter() < scheduled:
            pass
        sock.sendall(request)
        read_response(sock, buf)
        latencies.append((time.perf_counter() - scheduled) * 1e6)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(json.dumps({"p50_us": pick(0.50), "p99_us": pick(0.99), "n": len(latencies)}))


if __name__ == "__main__":
    main()
