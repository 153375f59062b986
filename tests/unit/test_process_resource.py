"""A process's own resource: OTEL_RESOURCE_ATTRIBUTES as the OpenTelemetry specification reads
it, and the container and pod its cgroup path names, for each runtime and cgroup driver."""

from __future__ import annotations

import pytest

from probe_agent.resource import attributes_of_cgroup, parse_resource_attributes, resource_of

CID = "3f2a" * 16
POD = "0f6c3a52-1b2d-4e5f-8a9b-0c1d2e3f4a5b"


def test_the_list_is_trimmed_and_percent_decoded() -> None:
    assert parse_resource_attributes(" service.namespace = shop ,deployment.environment.name=prod%2Ceu,"
                                     "note=caf%C3%A9%20au%20lait,empty=") == {
        "service.namespace": "shop", "deployment.environment.name": "prod,eu",
        "note": "café au lait", "empty": ""}
    assert parse_resource_attributes("") == {}


@pytest.mark.parametrize("text, reason", [
    ("a=1,b", "'b' is not key=value"),
    ("=1", "'=1' is not key=value"),
    ("a b=1", "is not key=value with a plain key"),
    ("a=100%", "a % that starts no %XX escape"),
    ("a=%zz", "a % that starts no %XX escape"),
    ("a=%C3", "not UTF-8 once decoded"),
])
def test_a_list_that_does_not_parse_is_dropped_whole_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_resource_attributes(text)
    got = resource_of(b"OTEL_RESOURCE_ATTRIBUTES=service.namespace=shop," + text.encode() + b"\0", "/")
    assert got.attributes == [] and got.problem.startswith("OTEL_RESOURCE_ATTRIBUTES ignored: ")


@pytest.mark.parametrize("path, expected", [
    (f"/system.slice/docker-{CID}.scope", {"container.id": CID}),                       # docker, systemd
    (f"/docker/{CID}", {"container.id": CID}),                                           # docker, cgroupfs
    (f"/machine.slice/libpod-{CID}.scope/container", {"container.id": CID}),            # podman
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/"
     f"cri-containerd-{CID}.scope", {"container.id": CID, "k8s.pod.uid": POD}),          # containerd
    (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope",
     {"container.id": CID, "k8s.pod.uid": POD}),                                          # CRI-O, Guaranteed
    (f"/kubepods/besteffort/pod{POD}/{CID}", {"container.id": CID, "k8s.pod.uid": POD}),  # cgroupfs driver
    (f"/../../kubepods-besteffort-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
     {"container.id": CID, "k8s.pod.uid": POD}),              # read from inside another cgroup namespace
    (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-conmon-{CID}.scope",
     {"k8s.pod.uid": POD}),                                   # CRI-O's conmon: the pod, not a container
    ("/user.slice/user-1000.slice/session-2.scope", {}),
    ("/", {}),
    (f"/system.slice/docker-{CID[:-1]}.scope", {}),           # 63 hex digits: not a container id
])
def test_container_and_pod_from_the_cgroup_path(path: str, expected: dict[str, str]) -> None:
    assert attributes_of_cgroup(path) == expected


def test_the_service_name_and_what_wins() -> None:
    cgroup = f"/system.slice/docker-{CID}.scope"
    env = (b"PATH=/bin\0MY_OTEL_SERVICE_NAME=no\0OTEL_RESOURCE_ATTRIBUTES=service.name=from-list,"
           b"container.id=given,host.name=spoofed,process.pid=1\0SECRET=x\0")
    got = resource_of(env, cgroup)
    assert got.service_name == "from-list"           # no OTEL_SERVICE_NAME: the list's service.name
    assert got.attributes == [("container.id", "given")]   # the process's own word; Weft's keys dropped
    got = resource_of(env + b"OTEL_SERVICE_NAME=checkout\0", cgroup)
    assert got.service_name == "checkout" and got.problem == ""
    got = resource_of(b"PATH=/bin\0", cgroup)
    assert got == ("", [("container.id", CID)], "")
