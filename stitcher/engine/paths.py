"""Route patterns (`/users/{id}`, `/users/:id`, `/static/*`) and the paths they match.

`{name}` or `:name` stands for one non-empty path segment, a final `*` for the rest of the path
(none included); one trailing slash does not count. Patterns are tried in the order given.
Pure: the engine leaves out the traces of ignored routes with it, the export stage names spans.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

WILDCARD = "*"
_PARAM = re.compile(r"^(\{[^{}/]+\}|:[^/]+)$")


def segments(path: str) -> list[str] | None:
    """A path's segments; None for a request target that is not a path (`*`, an absolute URL)."""
    if not path.startswith("/"):
        return None
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path.split("/")[1:]


def pattern_error(pattern: str) -> str | None:
    """Why `pattern` is not one, or None."""
    if not pattern.startswith("/"):
        return f"{pattern!r} must start with /"
    if WILDCARD in pattern[:-1] or (pattern.endswith(WILDCARD) and not pattern.endswith("/*")):
        return f"{pattern!r}: * may only be the last segment"
    return None


def split_list(value: str | Sequence[str]) -> list[str]:
    """A setting's patterns: a YAML list, or one comma-separated string (an environment variable)."""
    raw = value.split(",") if isinstance(value, str) else value
    return [str(p).strip() for p in raw if str(p).strip()]


class PathPatterns:
    def __init__(self, patterns: Sequence[str], *, cached: bool = True) -> None:
        """`cached`: remember each path's answer (off for a caller that caches its own)."""
        self.patterns = list(patterns)
        self._compiled = [(p, segments(p) or []) for p in self.patterns]
        self.match = lru_cache(maxsize=65536)(self._match) if cached else self._match

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def _match(self, path: str) -> str | None:
        """The first pattern `path` matches, or None."""
        have = segments(path)
        if have is None:
            return None
        for pattern, want in self._compiled:
            if _matches(want, have):
                return pattern
        return None


def _matches(want: list[str], have: list[str]) -> bool:
    if want and want[-1] == WILDCARD:
        head = want[:-1]
        return len(have) >= len(head) and _matches(head, have[:len(head)])
    if len(want) != len(have):
        return False
    return all(w == s or (s != "" and _PARAM.match(w) is not None) for w, s in zip(want, have, strict=True))
