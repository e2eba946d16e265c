"""The OCI conformance suite with authentication on: every request goes through the token
flow (OCI_USERNAME / OCI_PASSWORD), and every category must still pass."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.integration.test_conformance import run_conformance
from tests.support.clients import Registry
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

USER, PASSWORD = "conformance", "conformance-password"
ADMIN, ADMIN_PASSWORD = "ops", "ops-password"  # reads /metrics (admins only)


def test_conformance_with_auth(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    secret_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    htpasswd = tmp_path / "htpasswd"
    admin_hash = bcrypt.hashpw(ADMIN_PASSWORD.encode(), bcrypt.gensalt(5)).decode()
    htpasswd.write_text(f"{USER}:{secret_hash}\n{ADMIN}:{admin_hash}\n")
    policy = tmp_path / "policy.yaml"
    rule = {"repository": "**", "pull": [USER], "push": [USER], "delete": [USER]}
    policy.write_text(yaml.safe_dump({"version": 1, "admins": [ADMIN], "rules": [rule]}))
    registry = registry_process(
        "berth",
        config={"auth": {"htpasswd": str(htpasswd), "policy": str(policy)}},
    )
    assert Registry(registry.url).get("/v2/").status == 401  # auth really is on
    pair = base64.b64encode(f"{ADMIN}:{ADMIN_PASSWORD}".encode()).decode()
    admin = {"Authorization": f"Basic {pair}"}
    before = Registry(registry.url).get("/metrics", headers=admin).body.decode()
    assert 'berth_auth_tokens_issued_total{kind="access"}' not in before

    run_conformance(registry, tmp_path, {"OCI_USERNAME": USER, "OCI_PASSWORD": PASSWORD})

    after = Registry(registry.url).get("/metrics", headers=admin).body.decode()
    assert 'berth_auth_tokens_issued_total{kind="access"}' in after
