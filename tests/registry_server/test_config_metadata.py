"""The metadata block of the server config: which index, and how to reach PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry_server import config
from registry_server.config import ConfigError, MetadataConfig, PostgresConfig


def load(tmp_path: Path, raw: dict[str, Any], env: dict[str, str] | None = None) -> config.Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config.load(path, env or {})


def test_sqlite_is_the_default(tmp_path: Path) -> None:
    assert config.load(None, {}).metadata == MetadataConfig("sqlite", None)
    assert load(tmp_path, {"metadata": {"driver": "sqlite"}}).metadata.driver == "sqlite"


def test_postgresql_with_a_dsn_file(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://berth:pw@db:5432/berth\n")
    loaded = load(
        tmp_path,
        {
            "metadata": {
                "driver": "postgresql",
                "postgresql": {"dsn_file": str(secret), "pool_size": "4"},
            }
        },
    ).metadata
    assert loaded == MetadataConfig("postgresql", PostgresConfig("", secret, 4))
    assert loaded.postgresql is not None
    assert loaded.postgresql.connection_string() == "postgresql://berth:pw@db:5432/berth"


def test_the_driver_from_the_environment(tmp_path: Path) -> None:
    raw = {"metadata": {"postgresql": {"dsn": "host=db dbname=berth"}}}
    with pytest.raises(ConfigError, match=re.escape("metadata.driver is sqlite")):
        load(tmp_path, raw)
    loaded = load(tmp_path, raw, {"BERTH_METADATA_DRIVER": "postgresql"}).metadata
    assert loaded.driver == "postgresql"
    assert loaded.postgresql == PostgresConfig("host=db dbname=berth", None, 10)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("postgresql", "metadata: expected a mapping"),
        ({"driver": "mysql"}, "metadata.driver: expected one of sqlite, postgresql"),
        ({"driver": 3}, "metadata.driver: expected one of"),
        ({"drivers": "sqlite"}, "metadata: unknown keys"),
        ({"driver": "postgresql"}, "dsn or metadata.postgresql.dsn_file is required"),
        ({"driver": "postgresql", "postgresql": {}}, "dsn_file is required"),
        ({"driver": "postgresql", "postgresql": "x"}, "metadata.postgresql: expected a mapping"),
        (
            {"driver": "postgresql", "postgresql": {"dsn": "x", "dsn_file": "/f"}},
            "not both",
        ),
        (
            {"driver": "postgresql", "postgresql": {"dsn": "x", "pool": 2}},
            "metadata.postgresql: unknown keys",
        ),
        (
            {"driver": "postgresql", "postgresql": {"dsn": "x", "pool_size": 0}},
            "metadata.postgresql.pool_size must be between 1 and 1000",
        ),
        (
            {"driver": "postgresql", "postgresql": {"dsn": "x", "pool_size": 2.5}},
            "metadata.postgresql.pool_size: expected an integer",
        ),
        (
            {"driver": "postgresql", "postgresql": {"dsn": ["x"]}},
            "metadata.postgresql.dsn: expected a string",
        ),
        (
            {"driver": "postgresql", "postgresql": {"dsn_file": "/nonexistent/dsn"}},
            "metadata.postgresql.dsn_file: cannot read",
        ),
    ],
)
def test_bad_metadata_is_a_config_error(tmp_path: Path, metadata: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, {"metadata": metadata})


def test_an_empty_dsn_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "dsn"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load(
            tmp_path,
            {"metadata": {"driver": "postgresql", "postgresql": {"dsn_file": str(empty)}}},
        )


def test_the_replica_id_from_the_file_the_environment_or_the_host(tmp_path: Path) -> None:
    import socket

    assert config.load(None, {}).metadata.replica() == socket.gethostname()
    from_file = load(tmp_path, {"metadata": {"replica_id": "registry-7f9c-x2"}}).metadata
    assert from_file.replica() == "registry-7f9c-x2"
    from_env = config.load(None, {"BERTH_REPLICA_ID": "registry-0"}).metadata
    assert from_env.replica() == "registry-0"
    with pytest.raises(ConfigError, match=r"metadata\.replica_id"):
        load(tmp_path, {"metadata": {"replica_id": "no spaces"}})
    with pytest.raises(ConfigError, match=r"metadata\.replica_id"):
        config.load(None, {"BERTH_REPLICA_ID": "x" * 64})


def test_replicas_on_postgresql_need_a_shared_signing_key(tmp_path: Path) -> None:
    """A key generated per process would make each replica refuse the others' tokens."""
    pg = {"driver": "postgresql", "postgresql": {"dsn": "postgresql://db/berth"}}
    with pytest.raises(ConfigError, match=r"auth\.signing_key is required with metadata\.driver"):
        load(tmp_path, {"metadata": pg, "auth": {}})
    key = tmp_path / "token.key"
    key.write_text("(not read by the config)")
    loaded = load(tmp_path, {"metadata": pg, "auth": {"signing_key": str(key)}})
    assert loaded.auth is not None and loaded.auth.signing_key == key
