"""Span names by route (`routes:` settings): patterns, the id heuristic, the method-only name,
where the route goes, the settings' errors, and `weft rebuild` naming its output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from stitcher.engine.model import Resource, Span
from stitcher.routes import RoutedSink, RouteNamer, RouteSettings, looks_like_id, routed
from stitcher.sinks import ExportStats
from weft.cli import cli
from weft.config import ConfigError, load_section


def _span(path: str, kind: str = "SERVER", method: str = "GET") -> Span:
    return Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent_span_id=b"\x03" * 8, kind=kind,  # type: ignore[arg-type]
                name=f"{method} {path}" if method else "HTTP", start_ns=1, end_ns=2,
                attributes=(("http.request.method", method or "_OTHER"), ("url.path", path),
                            ("http.response.status_code", 200)),
                resource=Resource("svc", "node-a", 7, "python3"), error=False)


PATTERNS = ["/users/{id}/orders", "/users/:id", "/static/*", "/users/me"]


@pytest.mark.parametrize(("path", "route"), [
    ("/users/4711/orders", "/users/{id}/orders"),
    ("/users/4711/orders/", "/users/{id}/orders"),     # one trailing slash does not count
    ("/users/alice", "/users/:id"),
    ("/users/me", "/users/:id"),                         # the first pattern that matches wins
    ("/static/css/app.css", "/static/*"),
    ("/static", "/static/*"),
])
def test_patterns_name_the_route(path: str, route: str) -> None:
    span = RouteNamer(RouteSettings(patterns=PATTERNS)).rename(_span(path))
    assert span.name == f"GET {route}"
    assert span.attr("http.route") == route and span.attr("url.path") == path


@pytest.mark.parametrize("path", ["/users//orders", "/users", "/users/1/orders/2", "/", "*", ""])
def test_a_path_no_pattern_matches_keeps_its_name_by_default(path: str) -> None:
    span = _span(path)
    assert RouteNamer(RouteSettings(patterns=PATTERNS)).rename(span) is span


@pytest.mark.parametrize(("path", "route"), [
    ("/users/4711/orders", "/users/*/orders"),
    ("/api/v2/items/550e8400-e29b-41d4-a716-446655440000", "/api/v2/items/*"),
    ("/apis/apps/v1beta1/deployments", "/apis/apps/v1beta1/deployments"),
    ("/oauth2/x509/s3", "/oauth2/x509/s3"),
    ("/orders/order-4711/lines/INV2024", "/orders/*/lines/*"),
    ("/objects/507f1f77bcf86cd799439011", "/objects/*"),
    ("/u/alice@example.com/settings", "/u/*/settings"),
    ("/t/" + "a" * 40, "/t/*"),
    ("/deadbeef/cafe", "/deadbeef/cafe"),                 # words made of hex letters stay
    ("/", "/"),
])
def test_the_heuristic_replaces_segments_that_look_like_ids(path: str, route: str) -> None:
    span = RouteNamer(RouteSettings(unmatched="heuristic")).rename(_span(path))
    assert (span.name, span.attr("http.route")) == (f"GET {route}", route)


def test_patterns_come_before_the_heuristic() -> None:
    namer = RouteNamer(RouteSettings(patterns=["/users/{id}"], unmatched="heuristic"))
    assert namer.rename(_span("/users/42")).name == "GET /users/{id}"
    assert namer.rename(_span("/carts/42")).name == "GET /carts/*"


def test_method_mode_names_a_span_by_its_method_alone() -> None:
    span = RouteNamer(RouteSettings(unmatched="method")).rename(_span("/users/42"))
    assert span.name == "GET" and span.attr("http.route") is None and span.attr("url.path") == "/users/42"
    namer = RouteNamer(RouteSettings(patterns=["/users/{id}"], unmatched="method"))
    matched = namer.rename(_span("/users/42"))
    assert matched.name == "GET /users/{id}"


def test_a_client_span_gets_the_route_as_its_url_template_and_keeps_its_ids() -> None:
    before = _span("/users/42", kind="CLIENT", method="POST")
    span = RouteNamer(RouteSettings(unmatched="heuristic")).rename(before)
    assert span.name == "POST /users/*" and span.attr("url.template") == "/users/*"
    assert span.attr("http.route") is None
    assert span._replace(name=before.name, attributes=before.attributes) == before


def test_a_method_outside_the_known_set_keeps_http_in_the_name() -> None:
    other = _span("/users/42")._replace(name="HTTP /users/42")     # the engine's _OTHER naming
    assert RouteNamer(RouteSettings(unmatched="heuristic")).rename(other).name == "HTTP /users/*"
    assert RouteNamer(RouteSettings(unmatched="method")).rename(other).name == "HTTP"


def test_scrub_paths_puts_the_route_in_url_path_and_url_full() -> None:
    settings = RouteSettings(patterns=["/users/{id}"], unmatched="heuristic", scrub_paths=True)
    server = RouteNamer(settings).rename(_span("/u/alice@example.com/orders/4711"))
    assert server.attr("url.path") == server.attr("http.route") == "/u/*/orders/*"
    client = _span("/users/42", kind="CLIENT")._replace(
        attributes=(("http.request.method", "GET"), ("url.path", "/users/42"),
                    ("url.full", "http://api.shop:8080/users/42")))
    renamed = RouteNamer(settings).rename(client)
    assert (renamed.attr("url.path"), renamed.attr("url.full"), renamed.attr("url.template")) == (
        "/users/{id}", "http://api.shop:8080/users/{id}", "/users/{id}")
    assert "scrub" not in RouteSettings().describe() and settings.describe().endswith(
        "; url.path and url.full carry the route")


def test_a_request_without_a_request_line_keeps_its_name() -> None:
    span = _span("", method="")
    assert RouteNamer(RouteSettings(unmatched="method")).rename(span) is span


@pytest.mark.parametrize("segment", ["42", "2024", "ab4711", "550e8400-e29b-41d4-a716-446655440000",
                                     "0123456789abcdef", "a@b"])
def test_ids(segment: str) -> None:
    assert looks_like_id(segment)


@pytest.mark.parametrize("segment", ["v2", "oauth2", "x509", "s3", "users", "deadbeefcafebabe", "", "svc-3"])
def test_words(segment: str) -> None:
    assert not looks_like_id(segment)


class _Collect:
    def __init__(self) -> None:
        self.stats = ExportStats()
        self.got: list[Span] = []

    def export(self, spans: Sequence[Span]) -> None:
        self.got.extend(spans)

    def queued(self) -> int:
        return 0

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        pass


def test_the_default_adds_no_stage_and_a_setting_does() -> None:
    inner = _Collect()
    assert routed(inner, RouteSettings()) is inner
    sink = routed(inner, RouteSettings(unmatched="heuristic"))
    assert isinstance(sink, RoutedSink) and sink.stats is inner.stats
    sink.export([_span("/users/42")])
    assert [s.name for s in inner.got] == ["GET /users/*"]


def test_settings_from_yaml_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "weft.yaml"
    cfg.write_text('routes:\n  patterns:\n    - "/users/{id}"\n    - /static/*\n  unmatched: heuristic\n')
    from_yaml = load_section(RouteSettings, "routes", config_file=cfg, env={})
    assert from_yaml.pattern_list() == ["/users/{id}", "/static/*"] and from_yaml.unmatched == "heuristic"
    from_env = load_section(RouteSettings, "routes", env={"WEFT_ROUTES_PATTERNS": "/a/{x}, /b/*",
                                                         "WEFT_ROUTES_UNMATCHED": "method"})
    assert from_env.pattern_list() == ["/a/{x}", "/b/*"] and from_env.unmatched == "method"
    assert from_env.describe() == "by 2 route patterns, else by method alone"
    assert RouteSettings().describe() == "by method and path" and not RouteSettings().renames


@pytest.mark.parametrize(("env", "message"), [
    ({"WEFT_ROUTES_UNMATCHED": "guess"}, "routes.unmatched='guess': expected one of path, heuristic, method"),
    ({"WEFT_ROUTES_PATTERNS": "users/{id}"}, "routes.patterns: 'users/{id}' must start with /"),
    ({"WEFT_ROUTES_PATTERNS": "/a/*/b"}, "routes.patterns: '/a/*/b': * may only be the last segment"),
    ({"WEFT_ROUTES_PATTERNS": "/a/b*"}, "routes.patterns: '/a/b*': * may only be the last segment"),
    ({"WEFT_ROUTES_SCRUB_PATHS": "true"}, "routes.scrub_paths needs routes.unmatched=heuristic (not 'path'), "
                                          "so that every path has a route to replace it"),
])
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_section(RouteSettings, "routes", env=env)
    assert str(err.value) == message


def test_rebuild_names_spans_by_route_and_leaves_out_ignored_routes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    done = runner.invoke(cli, ["simulate", "--nodes", "4", "--rps", "5", "--seconds", "1", "--seed", "5",
                               "--capture-dir", str(tmp_path)])
    assert done.exit_code == 0, done.output
    captures = sorted(map(str, tmp_path.glob("*.wcap")))
    out_plain, out_routed = tmp_path / "plain.jsonl", tmp_path / "routed.jsonl"
    assert runner.invoke(cli, ["rebuild", *captures, "--out", str(out_plain)]).exit_code == 0
    monkeypatch.setenv("WEFT_ROUTES_UNMATCHED", "method")
    done = runner.invoke(cli, ["rebuild", *captures, "--out", str(out_routed)])
    assert done.exit_code == 0, done.output

    def spans(path: Path) -> list[dict[str, object]]:
        return [sp for line in path.read_text().splitlines()
                for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"]]

    plain, renamed = spans(out_plain), spans(out_routed)
    assert plain and len(plain) == len(renamed)
    assert all(" /" in str(sp["name"]) for sp in plain)
    assert {sp["name"] for sp in renamed} <= {"GET", "POST", "PUT", "DELETE", "PATCH"}
    assert [(sp["spanId"], sp.get("parentSpanId")) for sp in plain] == \
        [(sp["spanId"], sp.get("parentSpanId")) for sp in renamed]

    # engine.ignore_routes: the traces whose root is to that path go, whole; the rest stay
    root_path = {str(sp["traceId"]): str(sp["name"]).split(" ", 1)[1]
                 for sp in plain if "parentSpanId" not in sp}
    assert len(set(root_path.values())) > 1, "the workload needs traces that start at different routes"
    ignored_path = sorted(root_path.values())[0]
    out_ignored = tmp_path / "ignored.jsonl"
    monkeypatch.delenv("WEFT_ROUTES_UNMATCHED")
    monkeypatch.setenv("WEFT_ENGINE_IGNORE_ROUTES", ignored_path)
    done = runner.invoke(cli, ["rebuild", *captures, "--out", str(out_ignored)])
    assert done.exit_code == 0, done.output
    gone = {trace for trace, path in root_path.items() if path == ignored_path}
    want = [sp for sp in plain if sp["traceId"] not in gone]
    def by_id(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return sorted(rows, key=lambda sp: str(sp["spanId"]))

    assert 0 < len(want) < len(plain) and by_id(spans(out_ignored)) == by_id(want)
    assert f"ignored routes {len(plain) - len(want)})" in done.output
