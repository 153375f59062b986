"""weft/config.py: defaults → YAML → WEFT_* env → overrides, and validate() messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from weft.config import ConfigError, KafkaSettings, RedisSettings, load_section, run_dir


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "weft.yaml"
    path.write_text(text)
    return path


def test_defaults_point_at_the_local_infra() -> None:
    kafka = load_section(KafkaSettings, "kafka", env={})
    assert kafka == KafkaSettings()
    assert kafka.bootstrap == "127.0.0.1:19092" and kafka.partitions == 4
    assert load_section(RedisSettings, "redis", env={}).url == "redis://127.0.0.1:16379/0"


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "kafka:\n  bootstrap: k1:9092,k2:9092\n  partitions: 12\n"
                           "  raw_topic: prod.raw\n")
    kafka = load_section(KafkaSettings, "kafka", config_file=path, env={})
    assert (kafka.bootstrap, kafka.partitions, kafka.raw_topic) == ("k1:9092,k2:9092", 12, "prod.raw")
    env = {"WEFT_KAFKA_PARTITIONS": "6", "WEFT_KAFKA_SASL_PASSWORD": "pw"}
    kafka = load_section(KafkaSettings, "kafka", config_file=path, env=env)
    assert (kafka.bootstrap, kafka.partitions, kafka.sasl_password) == ("k1:9092,k2:9092", 6, "pw")
    kafka = load_section(KafkaSettings, "kafka", config_file=path, env=env, partitions=2, bootstrap=None)
    assert (kafka.bootstrap, kafka.partitions) == ("k1:9092,k2:9092", 2)


def test_weft_config_env_names_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "redis:\n  url: rediss://cache:6380/1\n  key_ttl_s: 60\n")
    rds = load_section(RedisSettings, "redis", env={"WEFT_CONFIG": str(path)})
    assert (rds.url, rds.key_ttl_s) == ("rediss://cache:6380/1", 60)


def test_env_values_are_coerced_or_named_when_wrong() -> None:
    assert load_section(RedisSettings, "redis", env={"WEFT_REDIS_KEY_TTL_S": "90"}).key_ttl_s == 90
    with pytest.raises(ConfigError, match=r"WEFT_KAFKA_PARTITIONS='many': expected an integer"):
        load_section(KafkaSettings, "kafka", env={"WEFT_KAFKA_PARTITIONS": "many"})


def test_unknown_yaml_key_lists_the_known_ones(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "kafka:\n  bootstrapp: x:1\n")
    with pytest.raises(ConfigError) as err:
        load_section(KafkaSettings, "kafka", config_file=path, env={})
    assert "unknown key kafka.bootstrapp" in str(err.value) and "bootstrap" in str(err.value)
    assert str(path) in str(err.value)


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section 'kafka' must be a mapping"):
        load_section(KafkaSettings, "kafka", config_file=_yaml(tmp_path, "kafka: [1, 2]\n"), env={})


def test_empty_yaml_and_missing_section_give_defaults(tmp_path: Path) -> None:
    assert load_section(KafkaSettings, "kafka", config_file=_yaml(tmp_path, ""), env={}) == KafkaSettings()
    path = _yaml(tmp_path, "redis:\n  key_ttl_s: 5\n")
    assert load_section(KafkaSettings, "kafka", config_file=path, env={}) == KafkaSettings()


@pytest.mark.parametrize(("env", "message"), [
    ({"WEFT_KAFKA_BOOTSTRAP": ""}, "kafka.bootstrap is empty"),
    ({"WEFT_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol='TLS': allowed PLAINTEXT, SSL"),
    ({"WEFT_KAFKA_SASL_MECHANISM": "GSSAPI"}, "kafka.sasl_mechanism='GSSAPI': allowed PLAIN"),
    ({"WEFT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "sasl_mechanism must be set"),
    ({"WEFT_KAFKA_PARTITIONS": "0"}, "kafka.partitions=0: must be >= 1"),
    ({"WEFT_KAFKA_SSL_CA_LOCATION": "/no/ca.pem"}, "kafka.ssl_ca_location='/no/ca.pem': no such file"),
    ({"WEFT_KAFKA_SSL_CERTIFICATE_LOCATION": "/etc/hostname"},
     "kafka.ssl_certificate_location and kafka.ssl_key_location go together"),
    ({"WEFT_KAFKA_SSL_CERTIFICATE_LOCATION": "/etc/hostname", "WEFT_KAFKA_SSL_KEY_LOCATION": "/no/key"},
     "kafka.ssl_key_location='/no/key': no such file"),
])
def test_kafka_validate_names_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_section(KafkaSettings, "kafka", env=env)


@pytest.mark.parametrize(("env", "message"), [
    ({"WEFT_REDIS_URL": "http://x"}, "redis.url='http://x': must start with redis://"),
    ({"WEFT_REDIS_KEY_TTL_S": "0"}, "redis.key_ttl_s=0: must be >= 1"),
    ({"WEFT_REDIS_SSL_CA_CERTS": "/no/such/ca.pem"}, "redis.ssl_ca_certs='/no/such/ca.pem': no such file"),
])
def test_redis_validate_names_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_section(RedisSettings, "redis", env=env)
    assert message in str(err.value)


def test_a_ca_may_be_librdkafkas_probe_or_a_directory() -> None:
    for ca in ("probe", "/etc/ssl/certs"):
        settings = load_section(KafkaSettings, "kafka", env={"WEFT_KAFKA_SSL_CA_LOCATION": ca})
        assert settings.ssl_ca_location == ca


def test_confluent_settings_carry_only_what_is_set() -> None:
    conf = KafkaSettings(bootstrap="b:1", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                         sasl_username="u", sasl_password="p").validate().confluent()
    assert conf == {"bootstrap.servers": "b:1", "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u", "sasl.password": "p"}
    assert KafkaSettings().confluent() == {"bootstrap.servers": "127.0.0.1:19092",
                                           "security.protocol": "PLAINTEXT"}


def test_secrets_stay_out_of_repr() -> None:
    assert "hunter2" not in repr(KafkaSettings(sasl_password="hunter2"))
    assert "hunter2" not in repr(RedisSettings(password="hunter2"))
    assert RedisSettings(password="hunter2", username="u").client_kwargs() == {"password": "hunter2",
                                                                              "username": "u"}


def test_run_dir_follows_weft_run_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEFT_RUN_DIR", str(tmp_path / "r"))
    assert run_dir() == (tmp_path / "r").resolve()
    monkeypatch.delenv("WEFT_RUN_DIR")
    assert run_dir() == Path("run").resolve()
