"""Hostile HTTP clients for the agent's parser, run inside a test node against a real server:

  garbage    connections that send random bytes, then close
  bigheader  requests with a 64 KiB header (one line), then a normal end
  slowloris  connections that send a request head one byte at a time and never finish it
  idle       connections opened and held without sending anything

`python abuse.py HOST PORT --idle N --hold S` runs them all (idle and slowloris held for S
seconds) and prints one line of counts. Everything stays inside the node's namespace."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import socket
import time


def connect(host: str, port: int) -> socket.socket | None:
    try:
        return socket.create_connection((host, port), timeout=2)
    except OSError:
        return None


def garbage(host: str, port: int, n: int, rng: random.Random) -> int:
    sent = 0
    for _ in range(n):
        sock = connect(host, port)
        if sock is None:
            continue
        try:
            sock.sendall(rng.randbytes(rng.randint(1, 4096)))
            sent += 1
        except OSError:
            pass
        sock.close()
    return sent


def big_headers(host: str, port: int, n: int) -> int:
    done = 0
    for i in range(n):
        sock = connect(host, port)
        if sock is None:
            continue
        head = (f"GET /big-header-{i} HTTP/1.1\r\nHost: {host}\r\nX-Big: " + "a" * 65536
                + "\r\nConnection: close\r\n\r\n")
        try:
            sock.sendall(head.encode())
            sock.recv(4096)
            done += 1
        except OSError:
            pass
        sock.close()
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--garbage", type=int, default=200)
    parser.add_argument("--big", type=int, default=20)
    parser.add_argument("--slow", type=int, default=100)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--hold", type=float, default=5.0)
    ns = parser.parse_args()
    want = ns.idle + ns.slow + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    sent_garbage = garbage(ns.host, ns.port, ns.garbage, rng)
    sent_big = big_headers(ns.host, ns.port, ns.big)
    idle = [s for s in (connect(ns.host, ns.port) for _ in range(ns.idle)) if s is not None]
    slow = [s for s in (connect(ns.host, ns.port) for _ in range(ns.slow)) if s is not None]
    head = f"GET /slowloris HTTP/1.1\r\nHost: {ns.host}\r\nX-Drip: ".encode()
    end = time.monotonic() + ns.hold
    i = 0
    while time.monotonic() < end:           # one more byte per connection per round
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.send(head[i:i + 1] if i < len(head) else b"x")
        i += 1
        time.sleep(0.1)
    for sock in idle + slow:
        sock.close()
    print(f"garbage={sent_garbage} big={sent_big} idle={len(idle)} slow={len(slow)}", flush=True)


if __name__ == "__main__":
    main()
