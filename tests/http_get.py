"""One HTTP GET as a probe makes it: (status, body text), error statuses included."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
