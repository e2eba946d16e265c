"""The storage section's driver choice and its s3 block: typed, and every mistake a
ConfigError naming its key (never a silent fallback to the filesystem)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from registry_server import app, config
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.s3 import S3Driver

S3 = {"bucket": "blobs", "endpoint": "https://s3.example.com"}


def _load(tmp_path: Path, storage: dict[str, Any]) -> config.Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"storage": storage}))
    return config.load(path, env={})


def test_filesystem_is_the_default(tmp_path: Path) -> None:
    loaded = config.load(None, env={})
    assert loaded.storage.driver == "filesystem" and loaded.storage.s3 is None
    assert isinstance(
        app.build_driver(_load(tmp_path, {"root": str(tmp_path)}).storage), FilesystemDriver
    )


def test_s3_block_is_typed(tmp_path: Path) -> None:
    (tmp_path / "access").write_text("AKID\n")
    (tmp_path / "secret").write_text("s3cr3t\n")
    loaded = _load(
        tmp_path,
        {
            "driver": "s3",
            "s3": {
                **S3,
                "region": "eu-west-1",
                "prefix": "registry/main",
                "access_key_file": str(tmp_path / "access"),
                "secret_key_file": str(tmp_path / "secret"),
                "redirect": True,
                "part_size": "16777216",
                "tls_verify": False,
            },
        },
    )
    s3 = loaded.storage.s3
    assert s3 is not None
    assert (s3.bucket, s3.region, s3.prefix, s3.redirect, s3.part_size, s3.tls_verify) == (
        "blobs",
        "eu-west-1",
        "registry/main",
        True,
        16 << 20,
        False,
    )
    assert s3.credentials() == ("AKID", "s3cr3t")
    driver = app.build_driver(loaded.storage)
    assert isinstance(driver, S3Driver) and driver.redirect and driver.part_size == 16 << 20


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"driver": "gcs"}, "storage.driver: unknown storage driver 'gcs'"),
        ({"driver": "s3"}, "storage.s3.bucket is required"),
        ({"driver": "s3", "s3": {"endpoint": "http://x"}}, "storage.s3.bucket is required"),
        ({"s3": S3}, "storage.s3 is set but storage.driver is 'filesystem'"),
        ({"driver": "s3", "s3": {**S3, "colour": "red"}}, "storage.s3: unknown keys"),
        ({"driver": "s3", "s3": {**S3, "redirect": "yes"}}, "storage.s3.redirect"),
        ({"driver": "s3", "s3": {**S3, "part_size": 2.5}}, "storage.s3.part_size"),
        ({"driver": "s3", "s3": {**S3, "part_size": 1 << 20}}, "storage.s3.part_size"),
        ({"driver": "s3", "s3": {**S3, "bucket": ["a"]}}, "storage.s3.bucket"),
        ({"driver": "s3", "s3": {**S3, "endpoint": "s3.example.com"}}, "storage.s3.endpoint"),
        ({"driver": "s3", "s3": {**S3, "access_key": "a"}}, "access and secret key together"),
        (
            {"driver": "s3", "s3": {**S3, "redirect_expiry_seconds": 0}},
            "storage.s3.redirect_expiry_seconds",
        ),
        (
            {
                "driver": "s3",
                "s3": {**S3, "access_key_file": "/nonexistent/a", "secret_key_file": "/n/b"},
            },
            "storage.s3: cannot read a key file",
        ),
        ({"driver": "s3", "s3": "blobs"}, "storage.s3: expected a mapping"),
    ],
)
def test_mistakes_name_their_key(tmp_path: Path, storage: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        _load(tmp_path, storage)
    assert message in str(exc.value)


def test_an_unknown_driver_is_never_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError):
        app.build_driver(config.StorageConfig(driver="nfs"))
