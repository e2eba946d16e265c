"""The operator's rotation probe against a real berth process: it learns whether the
server holds a new credential without trying it, so its checks are never failed logins
(which the limiter would count against the account and the operator's address)."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
import yaml

from registry_operator import access, fetching, robots
from registry_server.auth import configured
from tests.support.clients import Registry
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]
ADMIN = ("admin", "admin-secret")


def _hash(secret: str) -> str:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(4)).decode()


def _policy(*robots_: robots.Credential) -> str:
    return yaml.safe_dump(
        {
            "admins": ["admin"],
            "robots": [
                {
                    "name": r.name,
                    "secret_hash": r.hash,
                    "access": [{"repository": "team-a/api", "actions": ["pull"]}],
                }
                for r in robots_
            ],
        }
    )


def _failures(api: Registry) -> float:
    text = api.get("/metrics", headers=_basic(*ADMIN)).body.decode()  # admins only
    return sum(float(v) for v in re.findall(r"^berth_auth_failures_total\{.*\} (\S+)$", text, re.M))


def _basic(name: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()}


def test_the_fingerprint_is_the_servers() -> None:
    stored = _hash("x")
    assert fetching.fingerprint(stored) == configured.secret_fingerprint(stored)


def test_probing_a_staged_credential_is_never_a_failed_login(
    registry_process: Start, tmp_path: Path
) -> None:
    current = robots.Credential("pull.team-a.1", _hash("current"), 0.0, "current")
    staged = robots.Credential("pull.team-a.2", _hash("staged"), 0.0, "staged")
    htpasswd, policy = tmp_path / "htpasswd", tmp_path / "policy.yaml"
    htpasswd.write_text(f"admin:{_hash(ADMIN[1])}\n")
    policy.write_text(_policy(current))
    process = registry_process(
        "berth",
        config={
            "auth": {
                "htpasswd": str(htpasswd),
                "policy": str(policy),
                "failure_limit": 3,
                "client_failure_limit": 5,
            }
        },
    )
    api = Registry(process.url)
    before = _failures(api)
    # The server does not have it yet: refused, as often as the operator asks ...
    for _ in range(12):
        assert fetching.probe(process.url, ADMIN, staged) == access.REFUSED
    assert fetching.probe(process.url, ADMIN, current) == access.ACCEPTED
    # ... and none of it was a failed login: nothing counted, nothing locked.
    assert _failures(api) == before
    policy.write_text(_policy(current, staged))
    deadline = time.monotonic() + 15
    while fetching.probe(process.url, ADMIN, staged) != access.ACCEPTED:
        assert time.monotonic() < deadline, "the server never reloaded the policy"
        time.sleep(0.2)
    assert api.get("/v2/", headers=_basic(staged.name, "staged")).status == 200
    # Same name, another hash (a rotation the server has not seen): not accepted.
    other = robots.Credential(staged.name, _hash("other"), 0.0, "other")
    assert fetching.probe(process.url, ADMIN, other) == access.REFUSED
    # Wrong admin credentials: the operator cannot tell, so it waits instead.
    assert fetching.probe(process.url, ("admin", "wrong"), staged) == access.UNREACHABLE
    # Without admin credentials, the login probe (as for servers before this endpoint).
    assert fetching.probe(process.url, None, staged) == access.ACCEPTED
