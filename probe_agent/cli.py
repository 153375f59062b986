"""`weft` subcommands of this stage."""

from __future__ import annotations

import click

commands: list[click.Command] = []


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def doctor(as_json: bool) -> None:
    """What this kernel and machine allow Weft to do; exits non-zero only if the agent cannot run."""
    import json

    from infra import broker, redis_server
    from probe_agent.kernel import probe_kernel
    from weft.config import ConfigError, KafkaSettings, RedisSettings, load_section

    try:
        kafka, rds = load_section(KafkaSettings, "kafka"), load_section(RedisSettings, "redis")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    features = probe_kernel()
    checks = {"broker": broker.reachable(kafka, timeout_s=2.0),
              "redis": redis_server.reachable(rds, timeout_s=2.0)}
    problems = features.blocking_problems()
    if as_json:
        report = {**features.to_dict(), **{name: {"reachable": check.ok, "detail": check.detail,
                                                   "warning": check.warning}
                                            for name, check in checks.items()}}
        click.echo(json.dumps(report, indent=2))
    else:
        for line in features.describe():
            click.echo(line)
        for line in features.injection_sentences():
            click.echo(f"header injection: {line}")
        for name, check in checks.items():
            click.echo(f"{name}: {'reachable' if check.ok else 'not reachable'}: {check.detail}")
            if check.warning:
                click.echo(f"{name}: warning: {check.warning}")
        for problem in problems:
            click.echo(f"BLOCKING: {problem}", err=True)
        click.echo("the agent can run here" if not problems else "the agent cannot run here")
    if problems:
        raise SystemExit(1)


commands.append(doctor)


@click.command("agent")
@click.option("--node", help="this node's name (default: the host name)")
@click.option("--cgroup", "cgroups", multiple=True,
              help="trace only the processes under this cgroup v2 directory, subtree included (repeatable)")
@click.option("--pid", "pids", multiple=True, type=int, help="trace only this process and its children")
@click.option("--kafka", "bootstrap", help="publish to this Kafka bootstrap (host:port[,...])")
@click.option("--capture", type=click.Path(dir_okay=False), help="write frames to this capture file")
@click.option("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = off)")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file with agent: and kafka: sections")
@click.option("--inject-headers", is_flag=True, default=None,
              help="put a W3C traceparent on outgoing HTTP/1.x requests (sock_ops + sk_msg)")
def agent(node: str | None, cgroups: tuple[str, ...], pids: tuple[int, ...], bootstrap: str | None,
          capture: str | None, metrics_port: int | None, config_file: str | None,
          inject_headers: bool | None) -> None:
    """Trace this node's HTTP requests, connections and thread lineage from the kernel."""
    from probe_agent.runner import run_agent

    raise SystemExit(run_agent(node=node, cgroups=cgroups or None, pids=pids or None,
                               bootstrap=bootstrap, capture=capture, metrics_port=metrics_port,
                               config_file=config_file, inject_headers=inject_headers))


commands.append(agent)
