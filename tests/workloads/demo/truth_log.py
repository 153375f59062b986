"""The truth log every Python demo process writes: one JSON object per line, flushed at once.

Row: {"rid", "parent_rid", "role": "server"|"client", "service", "hop"} (+ "peer", the client
address a server saw: behind the VIP that is the NAT router's). A server row's span's
true parent is the client span of the same rid; a client row's is the server span of
`parent_rid` (none when it is empty: a root). See infra/demo.py for the conversion.
"""

from __future__ import annotations

import json
import threading


class TruthLog:
    def __init__(self, path: str, service: str) -> None:
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        self._lock = threading.Lock()
        self.service = service

    def write(self, rid: str, parent_rid: str, role: str, hop: str, peer: str = "") -> None:
        row = {"rid": rid, "parent_rid": parent_rid, "role": role, "service": self.service, "hop": hop}
        if peer:
            row["peer"] = peer
        line = json.dumps(row, separators=(",", ":"))
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
