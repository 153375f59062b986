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
    kafka_ok, kafka_detail = broker.reachable(kafka, timeout_s=2.0)
    redis_ok, redis_detail = redis_server.reachable(rds, timeout_s=2.0)
    problems = features.blocking_problems()
    if as_json:
        report = {**features.to_dict(), "broker": {"reachable": kafka_ok, "detail": kafka_detail},
                  "redis": {"reachable": redis_ok, "detail": redis_detail}}
        click.echo(json.dumps(report, indent=2))
    else:
        for line in features.describe():
            click.echo(line)
        click.echo(f"broker: {'reachable' if kafka_ok else 'not reachable'}: {kafka_detail}")
        click.echo(f"redis: {'reachable' if redis_ok else 'not reachable'}: {redis_detail}")
        for problem in problems:
            click.echo(f"BLOCKING: {problem}", err=True)
        click.echo("the agent can run here" if not problems else "the agent cannot run here")
    if problems:
        raise SystemExit(1)


commands.append(doctor)
