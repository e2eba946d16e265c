"""A refused login costs the same whatever the name: the bcrypt work is the same for an
unknown name as for a wrong secret of any account, so response times do not tell which
names exist. Checked by the work done (the bcrypt costs verified), never by a clock."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import bcrypt
import pytest
import yaml

from registry_server.auth import configured
from registry_server.auth.model import TokenError, TokenRequest
from registry_server.config import AuthConfig
from registry_server.protocol import errors

# The operator's own mix: robots at cost 5, the admin at 10; people from htpasswd at 12.
# Smaller here to keep the test fast; what matters is that they differ.
COSTS = {"robot": 4, "root": 5, "alice": 6}


def _hash(secret: str, cost: int) -> str:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(cost)).decode()


@pytest.fixture
def authorizer(tmp_path: Path) -> configured.ConfiguredAuthorizer:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{_hash('alice-pw', COSTS['alice'])}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "admins": ["root"],
                "users": [{"name": "root", "password_hash": _hash("root-pw", COSTS["root"])}],
                "robots": [
                    {
                        "name": "robot",
                        "secret_hash": _hash("robot-pw", COSTS["robot"]),
                        "access": [{"repository": "a/b", "actions": ["pull"]}],
                    }
                ],
            }
        )
    )
    return configured.build(AuthConfig(htpasswd=htpasswd, policy=policy, failure_limit=0), "")


class CheckedCosts:
    """Records the cost of every hash bcrypt.checkpw is asked to verify."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.costs: list[int] = []
        self._lock = threading.Lock()
        real = bcrypt.checkpw

        def checkpw(password: bytes, hashed: bytes) -> bool:
            with self._lock:
                self.costs.append(int(hashed.split(b"$")[2]))
            return real(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", checkpw)

    def take(self) -> list[int]:
        with self._lock:
            taken, self.costs = sorted(self.costs), []
        return taken


def _basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


async def _refused_registry_login(
    authorizer: configured.ConfiguredAuthorizer, name: str, secret: str
) -> None:
    with pytest.raises(errors.RegistryError) as refused:
        await authorizer.authorize(_basic(name, secret), "192.0.2.1", [])
    assert refused.value.status == 401


async def test_unknown_names_and_wrong_secrets_do_the_same_work(
    authorizer: configured.ConfiguredAuthorizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = CheckedCosts(monkeypatch)
    every_cost = sorted(COSTS.values())
    for name in ("robot", "root", "alice", "nobody", "pull.team-a.1"):
        await _refused_registry_login(authorizer, name, "wrong")
        assert checked.take() == every_cost, name
    # The token endpoint logs in the same way (GET with Basic, POST with a password).
    for name in ("robot", "nobody"):
        for request in (
            TokenRequest(client="192.0.2.1", authorization=_basic(name, "wrong")),
            TokenRequest(
                client="192.0.2.1", grant_type="password", username=name, password="wrong"
            ),
        ):
            with pytest.raises(TokenError):
                await authorizer.issue_token(request)
            assert checked.take() == every_cost, name


async def test_a_right_secret_checks_only_its_own_hash(
    authorizer: configured.ConfiguredAuthorizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = CheckedCosts(monkeypatch)
    principal = await authorizer.authorize(_basic("robot", "robot-pw"), "192.0.2.1", [])
    assert principal.name == "robot"
    assert checked.take() == [COSTS["robot"]]
