"""The local Redis: Debian's `redis-server` with a config generated into the run directory,
loopback only, no persistence (the stitcher's state is rebuilt from Kafka, not from disk).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from infra.procs import Daemon, InfraError, Reachability, port_open, start_daemon, wait_until
from weft.config import RedisSettings

NAME = "redis"
HOST = "127.0.0.1"
# A health probe answers once: redis-py retries connection errors (auth errors among them)
# with backoff by default, which turns "wrong password" into a 5 s wait.
NO_RETRY = Retry(NoBackoff(), 0)


def redis_bin() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise InfraError("redis-server is not installed: run 'make setup' (Debian package redis-server)")
    return path


def write_config(run_dir: Path, port: int, password: str = "") -> Path:
    """The config this Redis runs with; rewritten on every start so it always matches the args."""
    lines = [
        f"bind {HOST}",
        "protected-mode yes",
        f"port {port}",
        "daemonize no",            # Weft tracks the pid itself
        "set-proc-title no",       # keep /proc/<pid>/cmdline equal to argv, for the pid-file check
        'save ""',
        "appendonly no",
        f"dir {run_dir}",
        "loglevel notice",
        "logfile \"\"",            # to stdout, which start_daemon sends to redis.log
    ]
    if password:
        lines.append(f"requirepass {password}")
    conf = run_dir / "redis.conf"
    run_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)  # it may hold the password
    return conf


def redis_url(port: int) -> str:
    return f"redis://{HOST}:{port}/0"


def redis_healthy(port: int, password: str = "", timeout_s: float = 1.0) -> bool:
    """Redis answers PING (with the password, when one is set)."""
    if not port_open(HOST, port, timeout_s):
        return False
    client = redis.Redis(host=HOST, port=port, password=password or None, socket_timeout=timeout_s,
                         socket_connect_timeout=timeout_s, retry=NO_RETRY)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis(run_dir: Path, port: int, *, password: str = "", timeout_s: float = 10.0) -> Daemon:
    conf = write_config(run_dir, port, password)
    daemon = start_daemon(run_dir, NAME, [redis_bin(), str(conf)], facts={"port": port})
    wait_until(daemon, lambda: redis_healthy(port, password), timeout_s=timeout_s)
    return daemon


def reachable(settings: RedisSettings, timeout_s: float = 2.0) -> Reachability:
    """Whether the configured Redis (local or production) answers PING."""
    client = redis.Redis.from_url(settings.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                  retry=NO_RETRY, **settings.client_kwargs())
    try:
        client.ping()
        warning = _eviction_risk(client, settings.url)
    except redis.RedisError as exc:
        if not _listening(settings.url, timeout_s):
            return Reachability(False, f"no answer from {_safe(settings.url)} ({exc})", listening=False)
        return Reachability(False, f"{_safe(settings.url)} accepts connections but refused the session "
                                   f"({exc}); check redis.password / redis.username and the redis.ssl_* "
                                   "settings", listening=True)
    finally:
        client.close()
    return Reachability(True, f"{_safe(settings.url)} answers PING", listening=True, warning=warning)


def _eviction_risk(client: redis.Redis, url: str) -> str:
    """A sentence when this Redis drops keys once it is full, else "" (also when it will not
    say). Every key Weft writes has a TTL, so the volatile-* policies evict them as surely as
    the allkeys-* ones; a silently dropped key costs a span its link, or exports it twice."""
    try:
        memory = client.info("memory")
    except redis.RedisError:
        return ""
    policy, limit = str(memory.get("maxmemory_policy", "noeviction")), int(memory.get("maxmemory", 0))
    if policy == "noeviction" or limit <= 0:
        return ""
    return (f"{_safe(url)} evicts keys when full (maxmemory {limit / 2**20:.0f} MiB, maxmemory-policy "
            f"{policy}): under memory pressure it would drop join state, and spans would lose their "
            "links or be exported twice; set maxmemory-policy noeviction (a full Redis then refuses "
            "writes: the stitcher retries, then stops with the reason) or give Weft a Redis of its own")


def _listening(url: str, timeout_s: float) -> bool:
    """Something accepts connections where `url` points (a TCP port, or a unix socket path)."""
    parsed = urlsplit(url)
    if parsed.scheme == "unix":
        return Path(parsed.path).exists()
    return port_open(parsed.hostname or "localhost", parsed.port or 6379, timeout_s)


def _safe(url: str) -> str:
    """The URL without a password in it, for messages."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url
