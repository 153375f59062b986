"""infra/: the real broker and Redis start, are found again, report status and stop by pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from infra import broker
from infra.procs import cmdline_of, find_daemon, free_port, pid_alive, read_pid_file, stop_pid
from infra.services import LocalInfra
from weft.config import KafkaSettings

pytestmark = [pytest.mark.infra]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalInfra]:
    infra = LocalInfra.start(tmp_path / "run", partitions=3)
    try:
        yield infra
    finally:
        infra.stop()


def test_start_twice_reuses_the_running_services(local: LocalInfra) -> None:
    again = LocalInfra.start(local.run_dir, partitions=3)
    assert again.started == ()
    assert (again.broker.pid, again.redis.pid) == (local.broker.pid, local.redis.pid)
    assert (again.bootstrap, again.redis_url) == (local.bootstrap, local.redis_url)
    again.stop()  # started nothing, so stops nothing
    assert pid_alive(local.broker.pid) and pid_alive(local.redis.pid)


def test_a_port_other_than_the_running_one_is_refused(local: LocalInfra) -> None:
    with pytest.raises(Exception, match="already runs on port"):
        LocalInfra.start(local.run_dir, broker_port=free_port())


def test_topics_exist_with_the_partition_count(local: LocalInfra) -> None:
    parts = broker.topic_partitions(local.bootstrap)
    defaults = KafkaSettings()
    assert parts[defaults.raw_topic] == 3
    assert parts[defaults.dead_letter_topic] == 3
    local.create_topic("extra", 5)
    local.create_topic("extra", 5)  # idempotent
    assert broker.topic_partitions(local.bootstrap)["extra"] == 5


def test_services_answer_on_loopback_with_the_settings(local: LocalInfra) -> None:
    kafka = local.kafka_settings()
    assert kafka.bootstrap.startswith("127.0.0.1:")
    producer = Producer(kafka.confluent())
    producer.produce(kafka.raw_topic, key=b"n1", value=b"hello")
    assert producer.flush(10) == 0
    consumer = Consumer({**kafka.confluent(), "group.id": "t-infra", "enable.auto.commit": False})
    # assign, not subscribe: a group join costs half a session timeout on Tansu.
    consumer.assign([TopicPartition(kafka.raw_topic, p, OFFSET_BEGINNING) for p in range(3)])
    try:
        deadline, got = time.monotonic() + 30, None
        while got is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got = msg.value()
    finally:
        consumer.close()
    assert got == b"hello"
    rds = local.redis_settings()
    client = redis.Redis.from_url(rds.url, **rds.client_kwargs())
    assert client.set("k", "v") and client.get("k") == b"v"
    assert client.config_get("save")["save"] == ""
    assert client.config_get("appendonly")["appendonly"] == "no"
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    client.close()


def test_redis_password_is_required_when_set(tmp_path: Path) -> None:
    infra = LocalInfra.start(tmp_path / "run", redis_password="s3cret")
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(infra.redis_url).ping()
        rds = infra.redis_settings()
        assert redis.Redis.from_url(rds.url, **rds.client_kwargs()).ping()
        assert LocalInfra.status(infra.run_dir)["redis"]["healthy"]
    finally:
        infra.stop()


def test_down_stops_exactly_the_recorded_pids(tmp_path: Path) -> None:
    a = LocalInfra.start(tmp_path / "a")
    b = LocalInfra.start(tmp_path / "b")  # same binaries, another run dir: must survive
    try:
        stopped = LocalInfra.down(a.run_dir)
        assert sorted(d.pid for d in stopped) == sorted([a.broker.pid, a.redis.pid])
        assert not pid_alive(a.broker.pid) and not pid_alive(a.redis.pid)
        assert not (a.run_dir / "broker.pid").exists() and not (a.run_dir / "redis.pid").exists()
        assert pid_alive(b.broker.pid) and pid_alive(b.redis.pid)
        assert broker.broker_healthy(b.bootstrap)
        assert LocalInfra.down(a.run_dir) == []
    finally:
        b.stop()
        a.stop()
    assert not pid_alive(b.broker.pid) and not pid_alive(b.redis.pid)


def test_stale_pid_file_of_a_reused_pid_is_not_trusted(tmp_path: Path) -> None:
    """A pid file naming a live process that is not ours: not found, not killed, replaced."""
    run_dir = tmp_path / "run"
    infra = LocalInfra.start(run_dir)
    recorded = read_pid_file(run_dir, "redis")
    assert recorded is not None
    infra.stop()
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        # The pid file infra.stop() removed, back again, as if the kernel had given redis' old
        # pid to `sleep`.
        record = {"pid": stranger.pid, "argv": list(recorded.argv), "start_ticks": recorded.start_ticks,
                  "log": str(recorded.log_file), "facts": dict(recorded.facts)}
        recorded.pid_file.write_text(json.dumps(record))
        assert find_daemon(run_dir, "redis") is None
        assert LocalInfra.status(run_dir)["redis"]["running"] is False
        assert LocalInfra.down(run_dir) == []
        assert stranger.poll() is None, "down killed a process it did not start"
        again = LocalInfra.start(run_dir)
        try:
            assert again.redis.pid != stranger.pid and again.redis in again.started
        finally:
            again.stop()
        assert stranger.poll() is None
    finally:
        stop_pid(stranger.pid)
        stranger.wait()


def test_status_reports_pids_ports_and_health(local: LocalInfra) -> None:
    status = LocalInfra.status(local.run_dir)
    assert status["broker"] == {**status["broker"], "running": True, "pid": local.broker.pid,
                                "port": local.broker_port, "bootstrap": local.bootstrap,
                                "healthy": True}
    assert status["redis"]["pid"] == local.redis.pid and status["redis"]["healthy"] is True
    assert status["redis"]["url"] == local.redis_url
    assert Path(status["broker"]["log"]).exists()
    assert cmdline_of(local.broker.pid) == local.broker.argv
    assert "127.0.0.1" in " ".join(local.broker.argv) and "0.0.0.0" not in " ".join(local.broker.argv)


def _weft(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "weft"), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_up_up_status_down(tmp_path: Path) -> None:
    env = {**os.environ, "WEFT_RUN_DIR": str(tmp_path / "run"),
           "WEFT_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
           "WEFT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "WEFT_KAFKA_PARTITIONS": "2"}
    env.pop("WEFT_CONFIG", None)
    try:
        first = _weft(["infra", "up"], env)
        assert first.returncode == 0, first.stderr
        assert "broker: started" in first.stdout and "redis: started" in first.stdout
        assert env["WEFT_KAFKA_BOOTSTRAP"] in first.stdout and env["WEFT_REDIS_URL"] in first.stdout
        second = _weft(["infra", "up"], env)
        assert second.returncode == 0, second.stderr
        assert "broker: already running" in second.stdout and "redis: already running" in second.stdout
        status = json.loads(_weft(["infra", "status", "--json"], env).stdout)
        assert status["broker"]["healthy"] and status["redis"]["healthy"]
        assert broker.topic_partitions(env["WEFT_KAFKA_BOOTSTRAP"])[KafkaSettings().raw_topic] == 2
        pids = [status["broker"]["pid"], status["redis"]["pid"]]
        down = _weft(["infra", "down"], env)
        assert down.returncode == 0 and all(f"stopped pid {p}" in down.stdout for p in pids)
        assert not any(pid_alive(p) for p in pids)
        assert "not running" in _weft(["infra", "status"], env).stdout
    finally:
        _weft(["infra", "down"], env)


def test_cli_refuses_a_non_loopback_bootstrap(tmp_path: Path) -> None:
    env = {**os.environ, "WEFT_RUN_DIR": str(tmp_path / "run"), "WEFT_KAFKA_BOOTSTRAP": "kafka.example:9092"}
    result = _weft(["infra", "up"], env)
    assert result.returncode != 0 and "not a loopback host:port" in result.stderr
    assert not (tmp_path / "run" / "broker.pid").exists()


def test_concurrent_starts_share_one_broker_and_one_redis(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: LocalInfra.start(tmp_path / "run"), range(3)))
    try:
        assert len({(r.broker.pid, r.redis.pid) for r in results}) == 1
        assert sum(len(r.started) for r in results) == 2
    finally:
        for r in results:
            r.stop()
    assert not pid_alive(results[0].broker.pid) and not pid_alive(results[0].redis.pid)
