"""Authentication and access control through the HTTP API, in process (aiohttp test server).

Real clients over a real process are in tests/integration/test_auth_clients.py; this file
covers the protocol details fast: challenges, the token endpoint, Basic and Bearer on
registry requests, policy decisions, catalog filtering, mounts and rate limiting.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY

from registry_server.app import build_app
from registry_server.auth.model import Access
from registry_server.auth.tokens import SigningKey, TokenCodec
from registry_server.config import AuthConfig, Config, HttpConfig, StorageConfig
from registry_server.http.context import SERVICES

SECRETS = {"alice": "alice-pw", "root": "root-pw", "puller": "puller-secret", "ci": "ci-secret"}


def bhash(secret: str) -> str:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(4)).decode()


def policy_document() -> dict[str, Any]:
    return {
        "admins": ["root"],
        "users": [{"name": "root", "password_hash": bhash(SECRETS["root"])}],
        "robots": [
            {
                "name": "puller",
                "secret_hash": bhash(SECRETS["puller"]),
                "access": [{"repository": "team-a/api", "actions": ["pull"]}],
            },
            {
                "name": "ci",
                "secret_hash": bhash(SECRETS["ci"]),
                "access": [{"repository": "team-a/*", "actions": ["push"]}],
            },
        ],
        "rules": [
            {"repository": "team-a/*", "pull": ["alice"]},
            {"repository": "public/*", "anonymous_pull": True},
        ],
    }


def basic(name: str, secret: str | None = None) -> dict[str, str]:
    raw = f"{name}:{secret if secret is not None else SECRETS[name]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def challenge(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer"
    fields = {}
    for part in rest.split('",'):
        key, _, value = part.partition("=")
        fields[key.strip()] = value.strip('"')
    return fields


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return decoded


class Env:
    def __init__(self, client: TestClient[Any, Any], key: SigningKey, policy_path: Path) -> None:
        self.client = client
        self.key = key
        self.policy_path = policy_path

    async def token(
        self, scope: str | list[str], auth: dict[str, str] | None = None, **params: str
    ) -> str:
        scopes = [scope] if isinstance(scope, str) else scope
        query = [("service", "berth"), *(("scope", s) for s in scopes), *params.items()]
        resp = await self.client.get("/token", params=query, headers=auth or {})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["token"] == body["access_token"]
        token: str = body["token"]
        return token

    async def push_blob(self, repo: str, data: bytes, headers: dict[str, str]) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        resp = await self.client.post(
            f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, data=data, headers=headers
        )
        assert resp.status == 201, await resp.text()
        return digest

    async def push_image(self, repo: str, tag: str, headers: dict[str, str]) -> str:
        config = json.dumps({"repo": repo}).encode()
        cdigest = await self.push_blob(repo, config, headers)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": cdigest,
                    "size": len(config),
                },
                "layers": [],
            }
        ).encode()
        resp = await self.client.put(
            f"/v2/{repo}/manifests/{tag}",
            data=manifest,
            headers={**headers, "Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert resp.status == 201, await resp.text()
        return cdigest


EnvFactory = Callable[..., Any]


@pytest.fixture
async def make_env(tmp_path: Path) -> AsyncIterator[EnvFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def make(
        *,
        external_url: str = "",
        policy: bool = True,
        trusted_proxies: tuple[str, ...] = (),
        forwarded_header: str = "x-forwarded-for",
        **auth: Any,
    ) -> Env:
        key_path = tmp_path / "token.key"
        key = ec.generate_private_key(ec.SECP256R1())
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        htpasswd = tmp_path / "htpasswd"
        htpasswd.write_text(f"alice:{bhash(SECRETS['alice'])}\n")
        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy_document()))
        config = Config(
            http=HttpConfig(
                external_url=external_url,
                trusted_proxies=trusted_proxies,
                forwarded_header=forwarded_header,
            ),
            storage=StorageConfig(root=tmp_path / "storage"),
            auth=AuthConfig(
                htpasswd=htpasswd,
                policy=policy_path if policy else None,
                signing_key=key_path,
                **auth,
            ),
        )
        client: TestClient[Any, Any] = TestClient(TestServer(build_app(config)))
        await client.start_server()
        clients.append(client)
        return Env(client, SigningKey.load(key_path), policy_path)

    yield make
    for client in clients:
        await client.close()


# --- challenges -------------------------------------------------------------------------


async def test_base_without_credentials_challenges(make_env: EnvFactory) -> None:
    env = await make_env()
    resp = await env.client.get("/v2/")
    assert resp.status == 401
    fields = challenge(resp.headers["WWW-Authenticate"])
    host = f"{env.client.server.host}:{env.client.server.port}"
    assert fields == {"realm": f"http://{host}/token", "service": "berth"}
    assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"


async def test_challenge_names_the_scope_and_the_external_url(make_env: EnvFactory) -> None:
    env = await make_env(external_url="https://registry.example.com/")
    resp = await env.client.post("/v2/team-a/api/blobs/uploads/")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer realm="https://registry.example.com/token",service="berth",'
        'scope="repository:team-a/api:pull,push"'
    )
    resp = await env.client.delete("/v2/team-a/api/manifests/v1")
    assert challenge(resp.headers["WWW-Authenticate"])["scope"] == "repository:team-a/api:delete"


async def test_basic_on_base_and_bad_password(make_env: EnvFactory) -> None:
    env = await make_env()
    assert (await env.client.get("/v2/", headers=basic("alice"))).status == 200
    resp = await env.client.get("/v2/", headers=basic("alice", "nope"))
    assert resp.status == 401
    assert "WWW-Authenticate" in resp.headers
    assert (await env.client.get("/v2/", headers=basic("nobody", "x"))).status == 401


# --- the token flow ------------------------------------------------------------------------


async def test_token_grants_the_intersection(make_env: EnvFactory) -> None:
    env = await make_env()
    token = await env.token(
        ["repository:team-a/api:pull,push", "repository:team-b/x:pull"], basic("alice")
    )
    claims = claims_of(token)
    assert claims["sub"] == "alice" and claims["aud"] == "berth" and claims["iss"] == "berth"
    assert claims["access"] == [{"type": "repository", "name": "team-a/api", "actions": ["pull"]}]
    assert claims["exp"] - claims["iat"] == 300
    assert {"nbf", "jti"} <= set(claims)
    # With it: pulling works (404: the repository is empty), pushing is denied.
    resp = await env.client.get("/v2/team-a/api/tags/list", headers=bearer(token))
    assert resp.status == 404
    resp = await env.client.post("/v2/team-a/api/blobs/uploads/", headers=bearer(token))
    assert resp.status == 403
    assert (await resp.json())["errors"][0]["code"] == "DENIED"


async def test_token_for_one_repository_is_refused_for_another(make_env: EnvFactory) -> None:
    env = await make_env()
    token = await env.token("repository:team-a/api:pull", basic("alice"))
    # alice may pull team-a/web, but this token was not issued for it: fetch another.
    resp = await env.client.get("/v2/team-a/web/tags/list", headers=bearer(token))
    assert resp.status == 401
    fields = challenge(resp.headers["WWW-Authenticate"])
    assert fields["error"] == "insufficient_scope"
    assert fields["scope"] == "repository:team-a/web:pull"
    # team-b is not alice's at all: a plain denial.
    resp = await env.client.get("/v2/team-b/x/tags/list", headers=bearer(token))
    assert resp.status == 403


async def test_pull_only_robot_cannot_push_or_delete(make_env: EnvFactory) -> None:
    env = await make_env()
    root = basic("root")
    digest = await env.push_image("team-a/api", "v1", root)
    robot = basic("puller")
    assert (await env.client.get("/v2/team-a/api/manifests/v1", headers=robot)).status == 200
    assert (await env.client.post("/v2/team-a/api/blobs/uploads/", headers=robot)).status == 403
    resp = await env.client.delete(f"/v2/team-a/api/blobs/{digest}", headers=robot)
    assert resp.status == 403
    token = await env.token("repository:team-a/api:pull,push,delete", robot)
    assert claims_of(token)["access"][0]["actions"] == ["pull"]
    resp = await env.client.delete("/v2/team-a/api/manifests/v1", headers=bearer(token))
    assert resp.status == 403


async def test_push_with_token_and_with_basic(make_env: EnvFactory) -> None:
    env = await make_env()
    token = await env.token("repository:team-a/api:pull,push", basic("ci"))
    await env.push_image("team-a/api", "v1", bearer(token))
    await env.push_image("team-a/web", "v1", basic("ci"))
    resp = await env.client.get("/v2/team-a/web/tags/list", headers=basic("alice"))
    assert (await resp.json())["tags"] == ["v1"]


async def test_anonymous_pull_only_where_allowed(make_env: EnvFactory) -> None:
    env = await make_env()
    await env.push_image("public/tool", "v1", basic("root"))
    await env.push_image("team-a/api", "v1", basic("root"))
    # Without any header, and with an anonymous token.
    assert (await env.client.get("/v2/public/tool/manifests/v1")).status == 200
    token = await env.token("repository:public/tool:pull,push")
    assert claims_of(token)["sub"] == ""
    assert claims_of(token)["access"][0]["actions"] == ["pull"]
    resp = await env.client.get("/v2/public/tool/manifests/v1", headers=bearer(token))
    assert resp.status == 200
    assert (await env.client.post("/v2/public/tool/blobs/uploads/")).status == 401
    assert (await env.client.get("/v2/team-a/api/manifests/v1")).status == 401
    anonymous = await env.token("repository:team-a/api:pull")
    assert claims_of(anonymous)["access"] == []
    resp = await env.client.get("/v2/team-a/api/manifests/v1", headers=bearer(anonymous))
    assert resp.status == 401


async def test_catalog_shows_only_what_the_caller_may_pull(make_env: EnvFactory) -> None:
    env = await make_env()
    root = basic("root")
    for repo in ("team-a/api", "team-a/web", "team-b/api", "public/tool"):
        await env.push_image(repo, "v1", root)

    async def catalog(headers: dict[str, str]) -> list[str]:
        resp = await env.client.get("/v2/_catalog", headers=headers)
        assert resp.status == 200, await resp.text()
        repositories: list[str] = (await resp.json())["repositories"]
        return repositories

    assert await catalog(root) == ["public/tool", "team-a/api", "team-a/web", "team-b/api"]
    assert await catalog(basic("alice")) == ["public/tool", "team-a/api", "team-a/web"]
    assert await catalog(basic("puller")) == ["public/tool", "team-a/api"]
    assert await catalog({}) == ["public/tool"]
    token = await env.token("registry:catalog:*", basic("alice"))
    assert await catalog(bearer(token)) == ["public/tool", "team-a/api", "team-a/web"]


async def test_mount_needs_pull_on_the_source(make_env: EnvFactory) -> None:
    env = await make_env()
    digest = await env.push_image("team-b/secret", "v1", basic("root"))
    await env.push_image("team-a/api", "v1", basic("root"))
    ci = basic("ci")
    resp = await env.client.post(
        "/v2/team-a/web/blobs/uploads/",
        params={"mount": digest, "from": "team-b/secret"},
        headers=ci,
    )
    assert resp.status == 202  # not mounted: an ordinary upload session instead
    own = await env.push_blob("team-a/api", b"shared layer", basic("root"))
    resp = await env.client.post(
        "/v2/team-a/web/blobs/uploads/", params={"mount": own, "from": "team-a/api"}, headers=ci
    )
    assert resp.status == 201


async def test_without_policy_accounts_have_all_rights(make_env: EnvFactory) -> None:
    env = await make_env(policy=False)
    await env.push_image("anything/goes", "v1", basic("alice"))
    assert (await env.client.get("/v2/anything/goes/manifests/v1")).status == 401


# --- OAuth2 form and refresh tokens -----------------------------------------------------


async def test_oauth_password_and_refresh_grants(make_env: EnvFactory) -> None:
    env = await make_env()
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": SECRETS["alice"],
        "service": "berth",
        "scope": "repository:team-a/api:pull",
        "client_id": "test",
        "access_type": "offline",
    }
    resp = await env.client.post("/token", data=form)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["expires_in"] == 300 and body["scope"] == "repository:team-a/api:pull"
    assert resp.headers["Cache-Control"] == "no-store"
    refresh = body["refresh_token"]
    access = body["access_token"]
    resp = await env.client.get("/v2/team-a/api/tags/list", headers=bearer(access))
    assert resp.status == 404

    resp = await env.client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": "berth",
            "scope": "repository:team-a/web:pull",
        },
    )
    assert resp.status == 200, await resp.text()
    renewed = await resp.json()
    assert "refresh_token" not in renewed
    assert claims_of(renewed["access_token"])["access"][0]["name"] == "team-a/web"

    # A refresh token is not an access token, and the other way round.
    resp = await env.client.get("/v2/team-a/api/tags/list", headers=bearer(refresh))
    assert resp.status == 401
    resp = await env.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": access}
    )
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_grant"

    # Without offline access there is no refresh token; wrong passwords are invalid grants.
    resp = await env.client.post("/token", data={**form, "access_type": ""})
    assert "refresh_token" not in await resp.json()
    resp = await env.client.post("/token", data={**form, "password": "nope"})
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_grant"


async def test_get_with_offline_token(make_env: EnvFactory) -> None:
    env = await make_env()
    resp = await env.client.get(
        "/token",
        params={"service": "berth", "scope": "repository:team-a/api:pull", "offline_token": "true"},
        headers=basic("alice"),
    )
    assert "refresh_token" in await resp.json()


async def test_refresh_token_dies_with_the_credential(make_env: EnvFactory) -> None:
    env = await make_env()
    resp = await env.client.post(
        "/token",
        data={
            "grant_type": "password",
            "username": "ci",
            "password": SECRETS["ci"],
            "access_type": "offline",
        },
    )
    refresh = (await resp.json())["refresh_token"]
    document = policy_document()
    document["robots"][1]["secret_hash"] = bhash("rotated")
    env.policy_path.write_text(yaml.safe_dump(document))
    authorizer = env.client.server.app[SERVICES].auth
    authorizer.files.poll()  # type: ignore[attr-defined]
    assert authorizer.files.poll()  # type: ignore[attr-defined]
    resp = await env.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": refresh}
    )
    assert resp.status == 400
    assert "revoked" in (await resp.json())["error_description"]


@pytest.mark.parametrize(
    ("params", "form", "status", "error"),
    [
        ({"service": "other"}, None, 400, "invalid_request"),
        (None, {"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        (None, {"grant_type": "password", "username": "alice"}, 400, "invalid_request"),
        (None, {"grant_type": "refresh_token", "refresh_token": "x.y.z"}, 400, "invalid_grant"),
    ],
)
async def test_token_endpoint_errors(
    make_env: EnvFactory,
    params: dict[str, str] | None,
    form: dict[str, str] | None,
    status: int,
    error: str,
) -> None:
    env = await make_env()
    if form is None:
        resp = await env.client.get("/token", params=params or {})
    else:
        resp = await env.client.post("/token", data=form)
    assert resp.status == status
    assert (await resp.json())["error"] == error


async def test_token_endpoint_bad_basic(make_env: EnvFactory) -> None:
    env = await make_env()
    resp = await env.client.get("/token", headers=basic("alice", "wrong"))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic ")


# --- forged and stale tokens against the running app -------------------------------------


async def test_forged_tokens_are_refused(make_env: EnvFactory) -> None:
    env = await make_env()
    wanted = [Access.repository("team-a/api", "pull")]
    path = "/v2/team-a/api/tags/list"

    async def status_with(token: str) -> tuple[int, str]:
        resp = await env.client.get(path, headers=bearer(token))
        return resp.status, resp.headers.get("WWW-Authenticate", "")

    good = TokenCodec(env.key, "berth").issue("alice", "berth", 60, wanted)[0]
    assert (await status_with(good))[0] == 404

    expired = TokenCodec(env.key, "berth", clock=lambda: 1_000_000_000.0)
    cases = {
        "expired": expired.issue("alice", "berth", 60, wanted)[0],
        "audience": TokenCodec(env.key, "berth").issue("alice", "other", 60, wanted)[0],
        "issuer": TokenCodec(env.key, "evil").issue("alice", "berth", 60, wanted)[0],
        "other key": TokenCodec(SigningKey.generate(), "berth").issue("alice", "berth", 60, wanted)[
            0
        ],
    }
    header, payload, signature = good.split(".")
    claims = claims_of(good)
    claims["sub"] = "root"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    cases["tampered"] = f"{header}.{forged_payload}.{signature}"
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    cases["alg none"] = f"{none_header}.{payload}."
    for name, token in cases.items():
        status, www = await status_with(token)
        assert status == 401, name
        assert 'error="invalid_token"' in www, name


async def test_removed_account_tokens_stop_working(make_env: EnvFactory) -> None:
    env = await make_env()
    token = await env.token("repository:team-a/api:pull", basic("puller"))
    document = policy_document()
    del document["robots"][0]
    env.policy_path.write_text(yaml.safe_dump(document))
    files = env.client.server.app[SERVICES].auth.files  # type: ignore[attr-defined]
    files.poll()
    assert files.poll()
    resp = await env.client.get("/v2/team-a/api/tags/list", headers=bearer(token))
    assert resp.status == 401


# --- failures: counted, logged without secrets, rate limited ------------------------------


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("berth_auth_failures_total", {"reason": reason}) or 0.0


async def test_failures_are_counted_logged_and_limited(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(failure_limit=3, failure_window_seconds=60)
    before = failures("bad_secret")
    for _ in range(3):
        resp = await env.client.get("/v2/", headers=basic("alice", "hunter2-wrong"))
        assert resp.status == 401
    assert failures("bad_secret") == before + 3
    # Now even the right password waits: the client is over its limit.
    resp = await env.client.get("/v2/", headers=basic("alice"))
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    resp = await env.client.get("/token", headers=basic("alice"))
    assert resp.status == 429
    assert "authentication failed" in caplog.text
    assert "hunter2-wrong" not in caplog.text and SECRETS["alice"] not in caplog.text
    metrics = await (await env.client.get("/metrics", headers=basic("root"))).text()
    assert 'berth_auth_failures_total{reason="bad_secret"}' in metrics


async def test_metrics_on_the_registrys_port_are_for_admins(make_env: EnvFactory) -> None:
    """They name every repository and tell, by the failures' reasons, which account
    names exist (review): with auth on, only admins read them on the registry's port."""
    env = await make_env()
    anonymous = await env.client.get("/metrics")
    assert anonymous.status == 401 and "WWW-Authenticate" in anonymous.headers
    assert (await env.client.get("/metrics", headers=basic("alice"))).status == 403
    admin = await env.client.get("/metrics", headers=basic("root"))
    assert admin.status == 200 and "berth_http_requests_total" in await admin.text()


async def test_guesses_sent_all_at_once_are_limited_as_one_after_another(
    make_env: EnvFactory,
) -> None:
    """Each guess counts from when its check starts, not once it failed: forty sent at
    once got forty checks before the first failure was recorded (review)."""
    env = await make_env(failure_limit=3, client_failure_limit=5, failure_window_seconds=60)
    guesses = [basic("alice", f"guess-{n}") for n in range(39)] + [basic("alice")]
    replies = await asyncio.gather(*(env.client.get("/v2/", headers=h) for h in guesses))
    statuses = [reply.status for reply in replies]
    assert statuses.count(401) <= 3 and 200 not in statuses
    assert statuses.count(429) == len(guesses) - statuses.count(401)
    # Once those failures drain, the right password works again (after a wait).
    assert (await env.client.get("/v2/", headers=basic("alice"))).status == 429


async def test_nodes_logging_in_at_once_with_one_secret_count_once(
    make_env: EnvFactory,
) -> None:
    """Twenty nodes behind one address (a NAT) log in at once with their robot's secret,
    just after a restart (nothing cached): they share one check, and none is refused."""
    env = await make_env(failure_limit=3, failure_window_seconds=60)
    replies = await asyncio.gather(
        *(env.client.get("/v2/", headers=basic("puller")) for _ in range(20))
    )
    assert [reply.status for reply in replies] == [200] * 20


async def test_failures_of_one_account_do_not_lock_out_another(make_env: EnvFactory) -> None:
    # Behind an Ingress that is not configured as a trusted proxy every client has the
    # controller's address: an attacker failing alice must not stop the robots.
    env = await make_env(failure_limit=3, failure_window_seconds=60)
    for _ in range(3):
        assert (await env.client.get("/v2/", headers=basic("alice", "guess"))).status == 401
    assert (await env.client.get("/v2/", headers=basic("alice"))).status == 429
    assert (await env.client.get("/v2/", headers=basic("puller"))).status == 200
    resp = await env.client.get(
        "/token", params={"scope": "repository:team-a/api:pull"}, headers=basic("puller")
    )
    assert resp.status == 200


def forwarded_for(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": f"{address}, 10.1.2.3"}  # the client, then a trusted hop


async def test_behind_a_trusted_proxy_each_client_has_its_own_meter(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(
        failure_limit=3, failure_window_seconds=60, trusted_proxies=("127.0.0.1", "10.0.0.0/8")
    )
    attacker, kubelet = forwarded_for("203.0.113.9"), forwarded_for("198.51.100.7")
    for _ in range(3):
        resp = await env.client.get("/v2/", headers={**basic("puller", "guess"), **attacker})
        assert resp.status == 401
    # The attacker is locked out of the account it hammered, even with the secret ...
    resp = await env.client.get("/v2/", headers={**basic("puller"), **attacker})
    assert resp.status == 429
    # ... and a kubelet behind the same proxy with the right secret is not.
    assert (await env.client.get("/v2/", headers={**basic("puller"), **kubelet})).status == 200
    resp = await env.client.get(
        "/token",
        params={"scope": "repository:team-a/api:pull"},
        headers={**basic("puller"), **kubelet},
    )
    assert resp.status == 200
    clients = {getattr(r, "client", None) for r in caplog.records}
    assert clients == {"203.0.113.9"}  # the logs name the client, not the proxy


async def test_forwarded_rfc7239_when_configured(make_env: EnvFactory) -> None:
    env = await make_env(
        failure_limit=2, trusted_proxies=("127.0.0.1",), forwarded_header="forwarded"
    )

    def via(address: str) -> dict[str, str]:
        return {"Forwarded": f'for="{address}";proto=https'}

    for _ in range(2):
        resp = await env.client.get("/v2/", headers={**basic("ci", "x"), **via("[2001:db8::1]")})
        assert resp.status == 401
    resp = await env.client.get("/v2/", headers={**basic("ci"), **via("[2001:db8::1]:4711")})
    assert resp.status == 429
    assert (await env.client.get("/v2/", headers={**basic("ci"), **via("192.0.2.1")})).status == 200
    # X-Forwarded-For is not the configured header: it names nobody.
    resp = await env.client.get("/v2/", headers={**basic("ci"), **forwarded_for("192.0.2.2")})
    assert resp.status == 200


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_env: EnvFactory) -> None:
    env = await make_env(failure_limit=3)  # no trusted proxies: the header is the client's text
    for n in range(3):
        headers = {**basic("alice", "guess"), **forwarded_for(f"203.0.113.{n}")}
        assert (await env.client.get("/v2/", headers=headers)).status == 401
    headers = {**basic("alice"), **forwarded_for("203.0.113.99")}
    assert (await env.client.get("/v2/", headers=headers)).status == 429


async def test_a_client_spraying_names_is_limited(make_env: EnvFactory) -> None:
    env = await make_env(failure_limit=3, client_failure_limit=5)
    for name in ("a", "b", "c", "d", "e"):
        assert (await env.client.get("/v2/", headers=basic(name, "Summer2026"))).status == 401
    assert (await env.client.get("/v2/", headers=basic("alice"))).status == 429


async def test_admins_read_which_credential_an_account_has(make_env: EnvFactory) -> None:
    env = await make_env()
    stored = {
        r["name"]: r["secret_hash"] for r in yaml.safe_load(env.policy_path.read_text())["robots"]
    }
    path = "/berth/v1/auth/credentials"
    resp = await env.client.get(path, params={"account": "puller"}, headers=basic("root"))
    assert resp.status == 200
    expected = hashlib.sha256(stored["puller"].encode()).hexdigest()[:16]
    assert await resp.json() == {"account": "puller", "fingerprint": expected}
    resp = await env.client.get(path, params={"account": "nobody"}, headers=basic("root"))
    assert await resp.json() == {"account": "nobody", "fingerprint": None}
    # Only admins, with Basic or a token for registry:accounts:*.
    assert (await env.client.get(path, params={"account": "puller"})).status == 401
    resp = await env.client.get(path, params={"account": "puller"}, headers=basic("alice"))
    assert resp.status == 403
    token = await env.token("registry:accounts:*", basic("root"))
    resp = await env.client.get(path, params={"account": "ci"}, headers=bearer(token))
    assert resp.status == 200 and (await resp.json())["fingerprint"]
    alice_token = await env.token("registry:accounts:*", basic("alice"))
    assert claims_of(alice_token)["access"] == []


async def test_repeated_basic_requests_cost_one_bcrypt(make_env: EnvFactory) -> None:
    env = await make_env()
    verifier = env.client.server.app[SERVICES].auth.passwords  # type: ignore[attr-defined]
    for _ in range(10):
        assert (await env.client.get("/v2/", headers=basic("alice"))).status == 200
    assert verifier.computations == 1


async def test_no_auth_section_means_no_token_endpoint(tmp_path: Path) -> None:
    app = build_app(Config(storage=StorageConfig(root=tmp_path)))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/v2/")).status == 200
        assert (await client.get("/token")).status == 404
