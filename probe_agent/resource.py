"""A process's own resource attributes: what an OpenTelemetry SDK inside it would report.

Two sources, both read from /proc without touching the process:

* its environment, and only two variables of it: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
  (`key=value,key=value`, values percent-encoded; OpenTelemetry's resource SDK specification).
  As that specification asks, a value that does not parse is dropped whole, never half-read.
  OTEL_SERVICE_NAME wins over a `service.name` in the list, as in every SDK;
* its cgroup v2 path, which container runtimes name after the container and Kubernetes after
  the pod: `container.id` (docker, containerd, CRI-O, podman; systemd or cgroupfs drivers) and
  `k8s.pod.uid`. With them a backend can join Weft's spans to its Kubernetes metadata. The
  process's own list wins over what the path tells.

Bounds and the keys Weft sets itself are in `schemas.resource`.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from schemas.resource import bounded

_SERVICE_VAR = b"OTEL_SERVICE_NAME="
_ATTRIBUTES_VAR = b"OTEL_RESOURCE_ATTRIBUTES="
# An attribute key: an HTTP token (RFC 9110), as W3C Baggage keys are.
_KEY = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# The innermost cgroup named after a container: "<runtime>-<id>.scope" (systemd driver) or the
# bare id (cgroupfs driver); conmon's own "crio-conmon-<id>.scope" is not the container.
_CONTAINER = re.compile(r"(?:(?:docker|cri-containerd|containerd|crio|libpod)-)?([0-9a-f]{64})(?:\.scope)?")
# A pod's cgroup: "kubepods-<qos>-pod<uid with _>.slice" (systemd) or "pod<uid>" (cgroupfs).
_POD = re.compile(r"(?:.*-)?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
                  r"(?:\.slice)?")


class ProcessResource(NamedTuple):
    service_name: str                    # "" when the process names none
    attributes: list[tuple[str, str]]    # bounded, sorted by key, none of Weft's own keys
    problem: str                         # why its OTEL_RESOURCE_ATTRIBUTES was dropped, or ""


def parse_resource_attributes(text: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES as a dict; ValueError naming the first entry that is wrong."""
    out: dict[str, str] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ValueError(f"{entry.strip()!r} is not key=value with a plain key")
        if _BAD_ESCAPE.search(value):
            raise ValueError(f"the value of {key} has a % that starts no %XX escape")
        try:
            out[key] = unquote_to_bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"the value of {key} is not UTF-8 once decoded") from None
    return out


def attributes_of_cgroup(path: str) -> dict[str, str]:
    """container.id and k8s.pod.uid told by a /proc/PID/cgroup v2 path (either may be absent)."""
    out: dict[str, str] = {}
    for part in reversed(path.split("/")):
        if "container.id" not in out and (found := _CONTAINER.fullmatch(part)):
            out["container.id"] = found[1]
        elif "k8s.pod.uid" not in out and (found := _POD.fullmatch(part)):
            out["k8s.pod.uid"] = found[1].replace("_", "-")
            break  # a pod's cgroup is never below its containers'
    return out


def resource_of(environ: bytes, cgroup_path: str) -> ProcessResource:
    """The resource of a process with this /proc/PID/environ content and cgroup path."""
    service = raw = ""
    for entry in environ.split(b"\0"):
        if entry.startswith(_SERVICE_VAR):
            service = entry[len(_SERVICE_VAR):].decode("utf-8", "replace")
        elif entry.startswith(_ATTRIBUTES_VAR):
            raw = entry[len(_ATTRIBUTES_VAR):].decode("utf-8", "replace")
    attributes = attributes_of_cgroup(cgroup_path)
    problem = ""
    if raw:
        try:
            attributes.update(parse_resource_attributes(raw))
        except ValueError as exc:
            problem = f"OTEL_RESOURCE_ATTRIBUTES ignored: {exc}"
    service = service or attributes.get("service.name", "")
    return ProcessResource(service, bounded(attributes.items()), problem)
