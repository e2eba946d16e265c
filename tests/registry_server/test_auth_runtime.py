"""The stateful helpers: failure rate limiting, the bcrypt cache, file reloading."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import bcrypt
import pytest

from registry_server.auth.passwords import PasswordVerifier
from registry_server.auth.ratelimit import FailureLimiter, FailureMeter
from registry_server.auth.reloading import AuthFiles, LoadError, fingerprint


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- rate limiting ------------------------------------------------------------------------


def test_meter_allows_a_burst_then_one_per_interval() -> None:
    clock = Clock()
    meter = FailureMeter(3, 60, clock=clock)
    for _ in range(2):
        meter.record_failure(b"a")
    assert meter.retry_after(b"a") == 0
    clock.now += 5
    meter.record_failure(b"a")  # the third of the burst, at t=1005
    # Failures drain at 60/3 = 20 s each from t=1000, all by t=1060; another may come
    # once only two are pending: at t=1020.
    assert meter.retry_after(b"a") == 15
    assert meter.retry_after(b"b") == 0  # per key
    clock.now = 1020.5
    assert meter.retry_after(b"a") == 0
    meter.record_failure(b"a")  # one more is allowed, then the next interval
    assert meter.retry_after(b"a") == 20
    # Failures spread out drain as they come: one every 20 s never blocks.
    clock.now += 80
    for _ in range(10):
        assert meter.retry_after(b"a") == 0
        meter.record_failure(b"a")
        clock.now += 20
    clock.now += 60  # all drained: forgotten
    assert meter.retry_after(b"a") == 0 and len(meter) == 0


def test_meter_disabled_and_bounded() -> None:
    off = FailureMeter(0, 60)
    for _ in range(100):
        off.record_failure(b"a")
    assert off.retry_after(b"a") == 0
    clock = Clock()
    small = FailureMeter(1, 60, clock=clock, max_keys=2)
    for key in (b"a", b"b", b"c"):
        small.record_failure(key)
    assert small.retry_after(b"a") == 0  # forgotten: the least recently failing of three
    assert small.retry_after(b"c") == 60
    assert len(small) == 2


def test_failures_of_one_account_do_not_block_another_or_another_client() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 60, client_limit=10, clock=clock)
    for _ in range(3):
        limiter.record_failure("10.0.0.1", "robot")
    assert limiter.retry_after("10.0.0.1", "robot") > 0
    # The same account from another client, another account from the same client: free.
    assert limiter.retry_after("10.0.0.2", "robot") == 0
    assert limiter.retry_after("10.0.0.1", "admin") == 0
    assert limiter.retry_after("10.0.0.1") == 0


def test_a_client_spraying_names_is_stopped_by_its_own_meter() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 60, client_limit=10, clock=clock)
    for n in range(10):
        limiter.record_failure("10.0.0.1", f"user-{n}")  # one guess per name
    assert limiter.retry_after("10.0.0.1", "user-99") > 0
    assert limiter.retry_after("10.0.0.1") > 0
    assert limiter.retry_after("10.0.0.2", "user-99") == 0  # others are not affected
    for _ in range(10):
        limiter.record_failure("10.0.0.3")  # failures naming no account (forged tokens)
    assert limiter.retry_after("10.0.0.3") > 0


def test_an_ipv6_client_is_metered_by_its_64_for_all_accounts() -> None:
    """One host may have a whole /64: spreading guesses over its addresses does not give
    each a client limit of its own (found by review). An account's failures stay with
    the address: the machines of a cloud subnet share one /64, and one node failing a
    robot's secret must not lock out the others."""
    clock = Clock()
    limiter = FailureLimiter(3, 60, client_limit=10, clock=clock)
    for n in range(3):
        limiter.record_failure(f"2001:db8:1:2::{n + 1:x}", "robot")
    assert limiter.retry_after("2001:db8:1:2::1", "robot") == 0  # one failure each
    for _ in range(2):
        limiter.record_failure("2001:db8:1:2::1", "robot")
    assert limiter.retry_after("2001:db8:1:2::1", "robot") > 0
    assert limiter.retry_after("2001:db8:1:2::9", "robot") == 0  # another node
    for n in range(5):
        limiter.record_failure(f"2001:db8:1:2:{n:x}::1")
    assert limiter.retry_after("2001:db8:1:2::abc") > 0  # 10 in the /64
    assert limiter.retry_after("2001:db8:1:3::1") == 0
    # An IPv4 client written as a mapped IPv6 address is the IPv4 client.
    for _ in range(3):
        limiter.record_failure("::ffff:10.0.0.7", "robot")
    assert limiter.retry_after("10.0.0.7", "robot") > 0
    assert limiter.retry_after("10.0.0.8", "robot") == 0
    limiter.record_failure("not:an address")  # a header's text is metered as it is
    assert limiter.retry_after("not:an address") == 0


def test_limiter_memory_is_bounded_whatever_the_names() -> None:
    limiter = FailureLimiter(3, 60, client_limit=1000, max_keys=100)
    for n in range(1000):
        limiter.record_failure(f"10.0.{n // 250}.{n % 250}", "x" * 8000 + str(n))
    assert len(limiter.per_account) == 100 and len(limiter.per_client) == 100


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
