"""`weft` subcommands of this stage: `weft infra up|down|status`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from infra.procs import InfraError
from infra.services import LocalInfra
from weft.config import ConfigError, KafkaSettings, RedisSettings, load_section, run_dir

_LOOPBACK = ("127.0.0.1", "localhost")


def _local_port(address: str, key: str) -> int:
    """The port of a loopback host:port; infra only starts services on this machine's loopback."""
    host, _, port = address.rpartition(":")
    if host not in _LOOPBACK or not port.isdigit():
        raise click.ClickException(
            f"{key}={address!r} is not a loopback host:port; 'weft infra' starts local services only "
            f"(point {key} at 127.0.0.1:PORT, or run your own Kafka/Redis there)")
    return int(port)


def _settings() -> tuple[KafkaSettings, RedisSettings]:
    try:
        return load_section(KafkaSettings, "kafka"), load_section(RedisSettings, "redis")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("infra")
def infra_group() -> None:
    """Start, inspect and stop the local broker (Tansu) and Redis, on loopback."""


@infra_group.command("up")
def up() -> None:
    """Start the broker and Redis (or find the ones already running) and create the topics."""
    kafka, rds = _settings()
    redis_hostport = rds.url.split("://", 1)[-1].split("/", 1)[0]
    try:
        infra = LocalInfra.start(run_dir(), broker_port=_local_port(kafka.bootstrap, "kafka.bootstrap"),
                                 redis_port=_local_port(redis_hostport, "redis.url"),
                                 partitions=kafka.partitions, redis_password=rds.password)
    except InfraError as exc:
        raise click.ClickException(str(exc)) from None
    fresh = {d.name for d in infra.started}
    for daemon, where in ((infra.broker, f"bootstrap {infra.bootstrap}"),
                          (infra.redis, f"url {infra.redis_url}")):
        verb = "started" if daemon.name in fresh else "already running"
        click.echo(f"{daemon.name}: {verb}, pid {daemon.pid}, {where}, log {daemon.log_file}")
    click.echo(f"topics: {kafka.raw_topic}, {kafka.dead_letter_topic} ({kafka.partitions} partitions)")
    click.echo(f"run dir: {infra.run_dir} ('weft infra down' stops them)")


@infra_group.command("down")
def down() -> None:
    """Stop exactly the broker and Redis that 'weft infra up' started here, by pid."""
    stopped = LocalInfra.down(run_dir())
    for daemon in stopped:
        click.echo(f"{daemon.name}: stopped pid {daemon.pid}")
    if not stopped:
        click.echo(f"nothing running under {run_dir()}")


@infra_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(as_json: bool) -> None:
    """What runs under the run directory, and whether it answers."""
    report = LocalInfra.status(run_dir())
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"run dir: {report['run_dir']}")
    for name in ("broker", "redis"):
        svc = report[name]
        if not svc["running"]:
            click.echo(f"{name}: not running")
            continue
        where = svc.get("bootstrap") or svc.get("url")
        health = "answers" if svc["healthy"] else "NOT answering"
        click.echo(f"{name}: pid {svc['pid']}, {where}, {health}, log {Path(svc['log'])}")


commands: list[click.Command] = [infra_group]
