"""The stateful helpers: failure rate limiting, the bcrypt cache, file reloading."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import bcrypt
import pytest

from registry_server.auth.passwords import PasswordVerifier
from registry_server.auth.ratelimit import FailureLimiter
from registry_server.auth.reloading import AuthFiles, LoadError, fingerprint


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- rate limiting ------------------------------------------------------------------------


def test_limiter_blocks_after_limit_and_slides() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 60, clock)
    for _ in range(2):
        limiter.record_failure("a")
        clock.now += 10
    assert limiter.retry_after("a") == 0
    limiter.record_failure("a")  # third failure at t=1020
    assert limiter.retry_after("a") == 40  # the first (t=1000) leaves the window at t=1060
    assert limiter.retry_after("b") == 0  # per client
    clock.now = 1060.5
    assert limiter.retry_after("a") == 0
    limiter.record_failure("a")  # three within the window again (1010, 1020, 1060.5)
    assert limiter.retry_after("a") == 10


def test_limiter_disabled_and_bounded() -> None:
    off = FailureLimiter(0, 60)
    for _ in range(100):
        off.record_failure("a")
    assert off.retry_after("a") == 0
    clock = Clock()
    small = FailureLimiter(1, 60, clock, max_clients=2)
    for client in ("a", "b", "c"):
        small.record_failure(client)
    assert small.retry_after("a") == 0  # forgotten: the oldest of three
    assert small.retry_after("c") == 60


# --- bcrypt off the loop, cached ------------------------------------------------------------

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


async def test_verifier_caches_success_only() -> None:
    clock = Clock()
    verifier = PasswordVerifier(cache_seconds=60, clock=clock)
    assert await verifier.verify("s3cret", HASH)
    assert await verifier.verify("s3cret", HASH)
    assert verifier.computations == 1
    assert not await verifier.verify("wrong", HASH)
    assert not await verifier.verify("wrong", HASH)
    assert verifier.computations == 3  # failures are never cached
    clock.now += 61
    assert await verifier.verify("s3cret", HASH)
    assert verifier.computations == 4
    # A new hash for the same password (rotation) is a different cache entry.
    other = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    assert await verifier.verify("s3cret", other)
    assert verifier.computations == 5


async def test_verifier_shares_concurrent_checks() -> None:
    verifier = PasswordVerifier()
    results = await asyncio.gather(*(verifier.verify("s3cret", HASH) for _ in range(20)))
    assert all(results)
    assert verifier.computations == 1


async def test_verifier_does_not_block_the_loop() -> None:
    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(10)).decode()
    verifier = PasswordVerifier()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    assert await verifier.verify("pw", slow)
    task.cancel()
    assert ticks >= 3  # the loop kept running while bcrypt computed


async def test_verifier_rejects_garbage_hash() -> None:
    assert not await PasswordVerifier().verify("x", "not-a-hash")


# --- files --------------------------------------------------------------------------------

POLICY_A = """
rules:
  - repository: team-a/*
    pull: [alice]
"""
POLICY_B = """
rules:
  - repository: team-a/*
    pull: [alice]
    push: [alice]
"""


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_initial_load_errors_are_raised(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules: [{repository: 'Bad Name'}]")
    with pytest.raises(LoadError, match="invalid repository pattern"):
        AuthFiles(None, policy).load()
    with pytest.raises(LoadError, match="cannot read"):
        AuthFiles(tmp_path / "missing", None).load()


def test_reload_after_change_settles(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    htpasswd = tmp_path / "htpasswd"
    write(policy, POLICY_A)
    write(htpasswd, f"alice:{HASH}\n")
    files = AuthFiles(htpasswd, policy)
    files.load()
    assert files.directory.policy.actions("alice", "team-a/x") == {"pull"}
    assert not files.poll()  # nothing changed
    write(policy, POLICY_B)
    assert not files.poll()  # seen once: wait until it stops changing
    assert files.poll()
    assert files.directory.policy.actions("alice", "team-a/x") == {"pull", "push"}
    write(htpasswd, f"alice:{HASH}\nbob:{HASH}\n")
    files.poll()
    assert files.poll()
    assert set(files.directory.accounts) == {"alice", "bob"}


def test_malformed_file_keeps_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = tmp_path / "policy.json"
    write(policy, '{"rules": [{"repository": "a", "pull": ["alice"]}]}')
    files = AuthFiles(None, policy)
    before = files.load()
    write(policy, '{"rules": [{"repository": "a", "pull": ["alice"]')  # truncated JSON
    with caplog.at_level(logging.ERROR, "registry_server.auth"):
        files.poll()
        assert not files.poll()
    assert files.directory is before
    assert "auth file rejected" in caplog.text
    caplog.clear()
    assert not files.poll()  # reported once, not on every poll
    assert "auth file rejected" not in caplog.text
    write(policy, '{"rules": [{"repository": "a", "pull": ["bob"]}]}')
    files.poll()
    assert files.poll()
    assert files.directory.policy.actions("bob", "a") == {"pull"}


def test_removed_file_keeps_previous(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, POLICY_A)
    files = AuthFiles(None, policy)
    before = files.load()
    policy.unlink()
    files.poll()
    assert not files.poll()
    assert files.directory is before


def test_kubernetes_symlink_swap(tmp_path: Path) -> None:
    """A mounted ConfigMap: policy.yaml -> ..data/policy.yaml, ..data -> ..<timestamp>."""
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2026_01_01_00_00_00.1"
    first.mkdir()
    (first / "policy.yaml").write_text(POLICY_A)
    (mount / "..data").symlink_to(first.name)
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    files = AuthFiles(None, mount / "policy.yaml")
    files.load()
    before = fingerprint(mount / "policy.yaml")

    second = mount / "..2026_01_01_00_00_01.2"
    second.mkdir()
    (second / "policy.yaml").write_text(POLICY_B)
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(second.name)
    os.replace(tmp_link, mount / "..data")  # the atomic swap kubelet does
    assert fingerprint(mount / "policy.yaml") != before
    files.poll()
    assert files.poll()
    assert files.directory.policy.actions("alice", "team-a/x") == {"pull", "push"}


async def test_watcher_task_applies_changes(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, POLICY_A)
    files = AuthFiles(None, policy, interval_seconds=0.05)
    files.load()
    await files.start()
    try:
        write(policy, POLICY_B)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "push" in files.directory.policy.actions("alice", "team-a/x"):
                break
        assert files.directory.policy.actions("alice", "team-a/x") == {"pull", "push"}
    finally:
        await files.stop()


async def test_verifier_survives_a_cancelled_caller() -> None:
    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(8)).decode()
    verifier = PasswordVerifier()
    first = asyncio.create_task(verifier.verify("pw", slow))
    second = asyncio.create_task(verifier.verify("pw", slow))
    await asyncio.sleep(0.001)
    first.cancel()
    assert await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert verifier.computations == 1
    assert await verifier.verify("pw", slow)  # remembered
    assert verifier.computations == 1


# --- start-up checks ----------------------------------------------------------------------


def test_config_keys_and_validation(tmp_path: Path) -> None:
    from registry_server import config

    path = tmp_path / "config.yaml"
    path.write_text(
        "auth:\n  htpasswd: /x/htpasswd\n  failure_limit: 3\n  reload_interval_seconds: 2\n"
    )
    loaded = config.load(path, env={})
    assert loaded.auth is not None
    assert loaded.auth.htpasswd == Path("/x/htpasswd") and loaded.auth.failure_limit == 3
    path.write_text("http:\n  workers: 2\nauth:\n  service: berth\n")
    with pytest.raises(config.ConfigError, match="signing_key is required"):
        config.load(path, env={})
    path.write_text("auth:\n  reload_interval_seconds: 0\n")
    with pytest.raises(config.ConfigError, match="reload_interval"):
        config.load(path, env={})


def test_build_refuses_unusable_files(tmp_path: Path) -> None:
    from registry_server.auth import configured
    from registry_server.config import AuthConfig, ConfigError

    bad_key = tmp_path / "token.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="signing_key"):
        configured.build(AuthConfig(signing_key=bad_key), "")
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules: {}")
    with pytest.raises(ConfigError, match="expected a list"):
        configured.build(AuthConfig(policy=policy), "")


def test_build_without_key_generates_one(caplog: pytest.LogCaptureFixture) -> None:
    from registry_server.auth import configured
    from registry_server.config import AuthConfig

    with caplog.at_level(logging.WARNING, "registry_server.auth"):
        authorizer = configured.build(AuthConfig(), "https://r.example.com")
    assert authorizer.codec.key.algorithm == "ES256"
    assert "tokens will not survive a restart" in caplog.text
    assert authorizer.settings.realm() == "https://r.example.com/token"
