"""Low-cardinality span names: the route each request's path belongs to (section `routes:`).

By default a span is named "{method} {path}" (the path as sent, query removed). Backends index
span names and span-metrics pipelines make one series per name, so an API whose paths carry ids
(`/users/4711/orders`) makes one name per id. These settings name a span by its route instead:

- `patterns`: route templates, tried in the order given; `{id}` or `:id` stands for one path
  segment, a final `*` for the rest of the path. `/users/{id}/orders` names
  `/users/4711/orders` "GET /users/{id}/orders".
- `unmatched` (a path no pattern matches): `path` keeps the raw path (the default);
  `heuristic` replaces each segment that looks like an identifier with `*` (a number, four
  digits in a row, a UUID, a hex hash, a long token, an email) and keeps words such as `v2`,
  `oauth2` or `x509`; `method` names the span by its method alone, as the OpenTelemetry HTTP
  conventions do when no route is known.

A server span gets the route as `http.route`, a client span as `url.template` (the conventions'
names); `url.path` keeps the path itself unless `scrub_paths` is on: then `url.path` and the path
in `url.full` carry the route too, so no id, token or email in a path leaves the stitcher (it
needs `unmatched: heuristic`, which gives every path a route). A route from `heuristic` is a
guess, not the application's own route table, so `patterns` should name the routes that matter.

Renaming runs as a sink in front of the exporter, after the join: it changes no id and no link,
so spans renamed by one worker and not by another (a changed setting) still form one trace.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from stitcher.engine.model import AttrValue, Span
from stitcher.engine.paths import WILDCARD, PathPatterns, pattern_error, segments, split_list
from stitcher.sinks import ForwardingSink, SpanSink
from weft.config import ConfigError

UNMATCHED_MODES = ("path", "heuristic", "method")

# What an identifier looks like in a path segment: a number, a run of 4+ digits inside a word
# (order-4711, INV2024; not v2, oauth2, x509), a UUID, a hex hash or object id, an email.
_ID = re.compile(r"^\d+$|\d{4}|^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
                 r"|^(?=.*\d)[0-9a-fA-F]{16,}$|@")
_LONG_TOKEN = 32     # a segment this long is a token, digits or not


@dataclass(frozen=True)
class RouteSettings:
    patterns: str | list[str] = ""    # YAML list, or comma-separated (WEFT_ROUTES_PATTERNS)
    unmatched: str = "path"
    scrub_paths: bool = False         # url.path / url.full carry the route, not the path

    def validate(self) -> RouteSettings:
        if self.unmatched not in UNMATCHED_MODES:
            raise ConfigError(f"routes.unmatched={self.unmatched!r}: "
                              f"expected one of {', '.join(UNMATCHED_MODES)}")
        if self.scrub_paths and self.unmatched != "heuristic":
            # else a path no pattern matches would go out as it came, ids and all
            raise ConfigError(f"routes.scrub_paths needs routes.unmatched=heuristic (not "
                              f"{self.unmatched!r}), so that every path has a route to replace it")
        for pattern in self.pattern_list():
            error = pattern_error(pattern)
            if error:
                raise ConfigError(f"routes.patterns: {error}")
        return self

    def pattern_list(self) -> list[str]:
        return split_list(self.patterns)

    @property
    def renames(self) -> bool:
        return bool(self.pattern_list()) or self.unmatched != "path"

    def describe(self) -> str:
        """One line for the log: how spans are named."""
        count = len(self.pattern_list())
        matched = f"by {count} route pattern{'s' if count != 1 else ''}, else " if count else ""
        rest = {"path": "by method and path", "heuristic": "by method and path with ids replaced by *",
                "method": "by method alone"}[self.unmatched]
        scrubbed = "; url.path and url.full carry the route" if self.scrub_paths else ""
        return f"{matched}{rest}{scrubbed}"


def looks_like_id(segment: str) -> bool:
    return len(segment) >= _LONG_TOKEN or _ID.search(segment) is not None


_KEEP = ""    # `_route`: the span keeps its name (unmatched: path)


class RouteNamer:
    """Path → route: the route, None (no route: the span is named by its method alone) or
    `_KEEP` (no pattern matched and `unmatched` is `path`)."""

    def __init__(self, settings: RouteSettings) -> None:
        self.settings = settings.validate()
        self._patterns = PathPatterns(settings.pattern_list(), cached=False)   # `route` caches
        self.route = lru_cache(maxsize=65536)(self._route)

    def _route(self, path: str) -> str | None:
        matched = self._patterns.match(path)
        if matched is not None:
            return matched
        mode = self.settings.unmatched
        if mode == "path":
            return _KEEP
        have = segments(path)
        if mode == "method" or have is None:    # `*` (OPTIONS), or another target that is no path
            return None
        return "/" + "/".join(WILDCARD if looks_like_id(s) else s for s in have)

    def rename(self, span: Span) -> Span:
        # the name's first word: the method, or HTTP for a method outside the known set
        method, sep, _ = span.name.partition(" ")
        path = span.attr("url.path")
        if not sep or not isinstance(path, str):
            return span     # no request line was read ("HTTP"): nothing to name it by
        route = self.route(path)
        if route is None:
            return span._replace(name=method)
        if route == _KEEP:
            return span
        key = "http.route" if span.kind == "SERVER" else "url.template"
        attrs: tuple[tuple[str, AttrValue], ...] = (*span.attributes, (key, route))
        if self.settings.scrub_paths:
            attrs = tuple(_scrubbed(k, v, path, route) for k, v in attrs)
        return span._replace(name=f"{method} {route}", attributes=attrs)

    def rename_all(self, spans: Sequence[Span]) -> list[Span]:
        rename = self.rename
        return [rename(s) for s in spans]


def _scrubbed(key: str, value: AttrValue, path: str, route: str) -> tuple[str, AttrValue]:
    """url.path, and the path at the end of url.full, as the route: what the conventions ask of
    an instrumentation that can tell sensitive parts of a path (ids, tokens, emails)."""
    if key == "url.path":
        return key, route
    if key == "url.full" and isinstance(value, str) and value.endswith(path):
        return key, value[:len(value) - len(path)] + route
    return key, value


class RoutedSink(ForwardingSink):
    """A sink that names spans by route (`RouteNamer`) before passing them on."""

    def __init__(self, inner: SpanSink, namer: RouteNamer) -> None:
        super().__init__(inner)
        self.namer = namer

    def export(self, spans: Sequence[Span]) -> None:
        self.inner.export(self.namer.rename_all(spans))


def routed(sink: SpanSink, settings: RouteSettings) -> SpanSink:
    """`sink` itself when spans keep their path names (the default), else `sink` behind a namer."""
    return RoutedSink(sink, RouteNamer(settings)) if settings.renames else sink
