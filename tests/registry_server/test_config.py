"""Server configuration: every invalid value is a ConfigError that names its key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry_server import __main__ as main
from registry_server import config

PEER = {"name": "us", "url": "http://us.example.com"}
ENDPOINT = {"name": "audit", "url": "http://hooks.example.com"}


def _load(tmp_path: Path, document: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return config.load(path, env=env or {})


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"peers": [{**PEER, "concurrency": "four"}]}, "replication.peers[0].concurrency"),
        ({"peers": [{**PEER, "chunk_size_mb": [1]}]}, "replication.peers[0].chunk_size_mb"),
        ({"peers": [{**PEER, "concurrency": 2.5}]}, "replication.peers[0].concurrency"),
        (
            {"peers": [{**PEER, "bandwidth_limit_mbps": "fast"}]},
            "replication.peers[0].bandwidth_limit_mbps",
        ),
        ({"peers": [{**PEER, "tls_verify": "false"}]}, "replication.peers[0].tls_verify"),
        ({"anti_entropy_interval_seconds": "often"}, "replication.anti_entropy_interval_seconds"),
        ({"tombstone_ttl_seconds": None}, "replication.tombstone_ttl_seconds"),
        ({"retry_max_seconds": {}}, "replication.retry_max_seconds"),
    ],
)
def test_bad_numbers_in_replication_name_their_key(
    tmp_path: Path, document: dict[str, Any], key: str
) -> None:
    with pytest.raises(config.ConfigError, match=f"^{re.escape(key)}"):
        _load(tmp_path, {"replication": {"region": "eu", **document}})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_seconds", "soon"),
        ("retry_max_seconds", [1]),
        ("batch", "many"),
        ("batch", 1.5),
        ("tls_verify", "no"),
    ],
)
def test_bad_numbers_in_notifications_name_their_key(
    tmp_path: Path, field: str, value: Any
) -> None:
    with pytest.raises(config.ConfigError, match=rf"^notifications\.endpoints\[0\]\.{field}"):
        _load(tmp_path, {"notifications": {"endpoints": [{**ENDPOINT, field: value}]}})


def test_good_numbers_still_load(tmp_path: Path) -> None:
    peer = {**PEER, "concurrency": "8", "bandwidth_limit_mbps": 1.5, "tls_verify": False}
    loaded = _load(tmp_path, {"replication": {"region": "eu", "peers": [peer]}})
    assert loaded.replication.peers[0].concurrency == 8
    assert loaded.replication.peers[0].bandwidth_limit_mbps == 1.5
    assert loaded.replication.peers[0].tls_verify is False


@pytest.mark.parametrize(
    ("document", "where"),
    [
        (
            {"replication": {"region": "eu", "peers": [{**PEER, "username": "a:b"}]}},
            "replication.peers[0]",
        ),
        (
            {"upstreams": [{"name": "a", "url": "http://x", "prefix": "p", "username": "a:b"}]},
            "upstreams[0]",
        ),
    ],
)
def test_a_username_with_a_colon_is_refused(
    tmp_path: Path, document: dict[str, Any], where: str
) -> None:
    """HTTP Basic splits user and password at the first colon: such a name cannot log in."""
    with pytest.raises(config.ConfigError, match=f"^{re.escape(where)}\\.username may not contain"):
        _load(tmp_path, document)


@pytest.mark.parametrize("level", ["loud", "", "10", "infos"])
def test_bad_log_level_is_a_config_error(tmp_path: Path, level: str) -> None:
    with pytest.raises(config.ConfigError, match=r"^log\.level"):
        _load(tmp_path, {"log": {"level": level}})
    with pytest.raises(config.ConfigError, match=r"^log\.level"):
        _load(tmp_path, {}, env={"BERTH_LOG_LEVEL": level or "x"})


def test_bad_log_format_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"^log\.format"):
        _load(tmp_path, {"log": {"format": "xml"}})


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "error", "critical"])
def test_log_levels_in_any_case(tmp_path: Path, level: str) -> None:
    assert _load(tmp_path, {"log": {"level": level}}).log.level == level


def test_start_up_with_a_bad_level_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"log": {"level": "loud"}}))
    assert main.main(["--config", str(path)]) == 2
    assert "log.level" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"http": {"workers": 0}}, "http.workers must be at least 1, got 0"),
        ({"limits": {"max_manifest_bytes": 10}}, "limits.max_manifest_bytes must be at least 1024"),
        ({"storage": {"reserve_bytes": -1}}, "storage.reserve_bytes must not be negative"),
        ({"auth": {"refresh_token_ttl_seconds": 0}}, "auth.refresh_token_ttl_seconds must be at"),
        ({"auth": {"reload_interval_seconds": 0}}, "auth.reload_interval_seconds must be positive"),
        (
            {"replication": {"region": "eu", "peers": [{**PEER, "chunk_size_mb": 0}]}},
            "replication.peers[0].chunk_size_mb must be at least 1",
        ),
        (
            {"notifications": {"endpoints": [{**ENDPOINT, "retry_max_seconds": 0}]}},
            "notifications.endpoints[0].retry_max_seconds must be positive",
        ),
        (
            {"upstreams": [{"name": "a", "url": "http://x", "prefix": "p", "timeout_seconds": 0}]},
            "upstreams[0].timeout_seconds must be positive",
        ),
    ],
)
def test_numbers_out_of_bounds_name_their_key_and_bounds(
    tmp_path: Path, document: dict[str, Any], message: str
) -> None:
    with pytest.raises(config.ConfigError, match=f"^{re.escape(message)}"):
        _load(tmp_path, document)


def test_scheduled_backups(tmp_path: Path) -> None:
    root = tmp_path / "data"
    loaded = _load(
        tmp_path,
        {
            "storage": {"root": str(root)},
            "backup": {"interval_seconds": 86400, "keep": 3, "dir": str(tmp_path / "b")},
        },
    )
    assert (loaded.backup.interval_seconds, loaded.backup.keep) == (86400, 3)
    assert loaded.backup.dir == tmp_path / "b"
    assert _load(tmp_path, {}).backup.interval_seconds == 0  # off unless asked


@pytest.mark.parametrize(
    ("backup", "extra", "message"),
    [
        ({"keep": 0}, {}, "backup.keep must be at least 1"),
        ({"interval_seconds": 60, "dir": "{root}/backups"}, {}, "outside storage.root"),
        ({"interval_seconds": 60, "dir": "{tmp}"}, {}, "outside storage.root"),
        (
            {"interval_seconds": 60},
            {"metadata": {"driver": "postgresql", "postgresql": {"dsn": "postgresql://x/y"}}},
            "with S3 or PostgreSQL use",
        ),
    ],
)
def test_scheduled_backups_refused(
    tmp_path: Path, backup: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    root = tmp_path / "data"
    backup = {
        k: v.format(root=root, tmp=tmp_path) if isinstance(v, str) else v for k, v in backup.items()
    }
    document = {"storage": {"root": str(root)}, "backup": backup, **extra}
    with pytest.raises(config.ConfigError, match=message):
        _load(tmp_path, document)


def test_relayed_hosts(tmp_path: Path) -> None:
    config = _load(tmp_path, {"http": {"relayed_hosts": ["localhost:5605", "127.0.0.1:5605"]}})
    assert config.http.relayed_hosts == ("localhost:5605", "127.0.0.1:5605")


@pytest.mark.parametrize("entry", ["localhost", "http://localhost:5605", "a@b:1", ":5605"])
def test_relayed_hosts_must_be_host_and_port(tmp_path: Path, entry: str) -> None:
    with pytest.raises(config.ConfigError, match=r"http\.relayed_hosts"):
        _load(tmp_path, {"http": {"relayed_hosts": [entry]}})


def test_credentials_files(tmp_path: Path) -> None:
    upstream = {
        "name": "a",
        "url": "http://x",
        "prefix": "p",
        "username_file": "/etc/berth/upstreams/a/username",
        "password_file": "/etc/berth/upstreams/a/password",
    }
    loaded = _load(tmp_path, {"upstreams": [upstream]}).upstreams[0]
    assert loaded.username_file == Path("/etc/berth/upstreams/a/username")
    assert loaded.as_peer().username_file == loaded.username_file
    assert loaded.as_peer().password_file == Path("/etc/berth/upstreams/a/password")


@pytest.mark.parametrize("value", [0, -1, 3601, "soon"])
def test_the_body_idle_timeout_is_bounded(tmp_path: Path, value: Any) -> None:
    with pytest.raises(config.ConfigError, match=r"^http\.body_idle_timeout_seconds"):
        _load(tmp_path, {"http": {"body_idle_timeout_seconds": value}})


def test_the_body_idle_timeout_is_read(tmp_path: Path) -> None:
    assert config.load(None, env={}).http.body_idle_timeout_seconds == 60
    loaded = _load(tmp_path, {"http": {"body_idle_timeout_seconds": 5}})
    assert loaded.http.body_idle_timeout_seconds == 5
