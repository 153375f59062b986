"""Settings shared by every component: where Kafka and Redis are, and how to reach them.

Each component has one frozen dataclass. Values come from defaults in code, then a YAML file
(`WEFT_CONFIG` or --config), then `WEFT_*` environment variables; `validate()` names the bad key.
Standard `OTEL_EXPORTER_OTLP_*` variables are read by the OTLP exporter itself and win there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A setting has a value Weft cannot use; the message names the key and what is allowed."""


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = "127.0.0.1:19092"
    raw_topic: str = "weft.raw"
    dead_letter_topic: str = "weft.deadletter"
    partitions: int = 4
    security_protocol: str = "PLAINTEXT"   # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = ""               # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    ssl_key_password: str = field(default="", repr=False)   # when the client key is encrypted

    _PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    _MECHANISMS = ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

    def validate(self) -> KafkaSettings:
        if not self.bootstrap:
            raise ConfigError("kafka.bootstrap is empty: give host:port[,host:port]")
        if self.security_protocol not in self._PROTOCOLS:
            raise ConfigError(f"kafka.security_protocol={self.security_protocol!r}: "
                              f"allowed {', '.join(self._PROTOCOLS)}")
        if self.sasl_mechanism not in self._MECHANISMS:
            raise ConfigError(f"kafka.sasl_mechanism={self.sasl_mechanism!r}: "
                              f"allowed {', '.join(m for m in self._MECHANISMS if m)}")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ConfigError("kafka.sasl_mechanism must be set when security_protocol is SASL_*")
        if self.partitions < 1:
            raise ConfigError(f"kafka.partitions={self.partitions}: must be >= 1")
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ConfigError("kafka.ssl_certificate_location and kafka.ssl_key_location go together: "
                              "set both or neither")
        _must_exist("kafka.ssl_ca_location", self.ca_path)
        _must_exist("kafka.ssl_certificate_location", self.ssl_certificate_location)
        _must_exist("kafka.ssl_key_location", self.ssl_key_location)
        return self

    @property
    def ca_path(self) -> str:
        """The CA file or directory to read; "" for none or for librdkafka's "probe" (the
        system's usual places)."""
        return "" if self.ssl_ca_location == "probe" else self.ssl_ca_location

    def confluent(self) -> dict[str, str]:
        """librdkafka client settings (producer or consumer) for these settings."""
        conf = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password,
        }
        conf.update({k: v for k, v in optional.items() if v})
        return conf


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:16379/0"   # rediss:// for TLS
    password: str = field(default="", repr=False)
    username: str = ""
    ssl_ca_certs: str = ""
    ssl_certfile: str = ""      # client certificate, for servers that require one (mutual TLS)
    ssl_keyfile: str = ""
    ssl_password: str = field(default="", repr=False)   # when the client key is encrypted
    key_ttl_s: int = 3600

    def validate(self) -> RedisSettings:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis.url={self.url!r}: must start with redis://, rediss:// or unix://")
        if self.key_ttl_s < 1:
            raise ConfigError(f"redis.key_ttl_s={self.key_ttl_s}: must be >= 1")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("redis.ssl_certfile and redis.ssl_keyfile go together: set both or neither")
        for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            _must_exist(f"redis.{key}", getattr(self, key))
        return self

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.password:
            kwargs["password"] = self.password
        if self.username:
            kwargs["username"] = self.username
        tls = {"ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
               "ssl_keyfile": self.ssl_keyfile, "ssl_password": self.ssl_password}
        kwargs.update({k: v for k, v in tls.items() if v})
        return kwargs


T = TypeVar("T")


def _coerce(raw: str, target: Any, key: str) -> Any:
    if isinstance(target, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    if isinstance(target, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if isinstance(target, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    return raw


def _must_exist(key: str, path: str) -> None:
    """A file setting that names nothing would fail later, deep inside a client."""
    if path and not Path(path).exists():
        raise ConfigError(f"{key}={path!r}: no such file")


def load_section(cls: type[T], section: str, *, config_file: str | Path | None = None,
                 env: dict[str, str] | None = None, **overrides: Any) -> T:
    """Build `cls` from defaults, then YAML section `section`, then WEFT_<SECTION>_<FIELD> env,
    then explicit `overrides` (CLI flags; None means "not given")."""
    env = dict(os.environ) if env is None else env
    default = cls()
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    path = config_file or env.get("WEFT_CONFIG")
    if path:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        sect = doc.get(section) or {}
        if not isinstance(sect, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for key, value in sect.items():
            if key not in names:
                raise ConfigError(f"{path}: unknown key {section}.{key}; known: {', '.join(sorted(names))}")
            values[key] = value
    prefix = f"WEFT_{section.upper()}_"
    for key in names:
        raw = env.get(prefix + key.upper())
        if raw is not None:
            values[key] = _coerce(raw, getattr(default, key), prefix + key.upper())
    values.update({k: v for k, v in overrides.items() if v is not None})
    obj = dataclasses.replace(default, **values)  # type: ignore[type-var]
    validate = getattr(obj, "validate", None)
    return validate() if validate else obj


def run_dir() -> Path:
    """Where pid files, logs and local state live (WEFT_RUN_DIR, default ./run)."""
    return Path(os.environ.get("WEFT_RUN_DIR", "run")).resolve()
