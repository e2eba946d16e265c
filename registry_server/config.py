"""Typed, frozen server settings: a YAML file, then environment overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """The configuration is invalid; the message says which key and why."""


@dataclass(frozen=True)
class HttpConfig:
    addr: str = "127.0.0.1:5000"
    external_url: str = ""
    workers: int = 1

    @property
    def host(self) -> str:
        return self.addr.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])


@dataclass(frozen=True)
class StorageConfig:
    root: Path = Path("./data")
    index: str = "sqlite"


@dataclass(frozen=True)
class LimitsConfig:
    max_manifest_bytes: int = 4 * 1024 * 1024
    upload_purge_after_seconds: int = 24 * 3600


@dataclass(frozen=True)
class AuthConfig:
    service: str = "berth"
    issuer: str = "berth"
    htpasswd: Path | None = None
    policy: Path | None = None
    signing_key: Path | None = None
    token_ttl_seconds: int = 300


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig | None = None
    log: LogConfig = field(default_factory=LogConfig)


_ENV: dict[str, tuple[str, str, type]] = {
    "BERTH_HTTP_ADDR": ("http", "addr", str),
    "BERTH_EXTERNAL_URL": ("http", "external_url", str),
    "BERTH_WORKERS": ("http", "workers", int),
    "BERTH_STORAGE_ROOT": ("storage", "root", Path),
    "BERTH_MAX_MANIFEST_BYTES": ("limits", "max_manifest_bytes", int),
    "BERTH_LOG_LEVEL": ("log", "level", str),
}

_SECTIONS: dict[str, type] = {
    "http": HttpConfig,
    "storage": StorageConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
    "log": LogConfig,
}


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{name}: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        current = getattr(defaults, key)
        if value is None:
            values[key] = None
        elif isinstance(current, Path) or (
            current is None and key in ("htpasswd", "policy", "signing_key")
        ):
            values[key] = Path(str(value))
        elif isinstance(current, bool) or not isinstance(current, int):
            values[key] = value if not isinstance(current, str) else str(value)
        else:
            try:
                values[key] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}.{key}: expected an integer") from None
    return cls(**values)


def load(path: Path | None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        raw = loaded
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}")
    sections = {
        name: _section(name, cls, raw[name])
        for name, cls in _SECTIONS.items()
        if name in raw and raw[name] is not None
    }
    config = Config(**sections)
    for var, (section, key, kind) in _ENV.items():
        if var in env and env[var] != "":
            try:
                value = kind(env[var])
            except ValueError:
                raise ConfigError(f"{var}: invalid value {env[var]!r}") from None
            config = replace(config, **{section: replace(getattr(config, section), **{key: value})})
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if ":" not in config.http.addr:
        raise ConfigError(f"http.addr must be host:port, got {config.http.addr!r}")
    try:
        config.http.port  # noqa: B018 - validation by parsing
    except ValueError:
        raise ConfigError(f"http.addr has an invalid port: {config.http.addr!r}") from None
    if config.http.workers < 1:
        raise ConfigError("http.workers must be >= 1")
    if config.storage.index != "sqlite":
        raise ConfigError(f"storage.index: unknown index backend {config.storage.index!r}")
    if config.limits.max_manifest_bytes < 1024:
        raise ConfigError("limits.max_manifest_bytes must be at least 1024")
