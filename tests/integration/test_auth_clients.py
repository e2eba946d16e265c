"""Authentication and access control against a real server process, with real clients.

skopeo (--creds and a docker config.json --authfile), crane (`auth login`) and oras
authenticate through the Bearer token flow; raw HTTP proves the refusals: challenges,
pull-only robots, tokens for another repository, forged tokens, anonymous pull, catalog
filtering, and policy changes picked up while the server runs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registry_server.auth.model import Access
from registry_server.auth.tokens import SigningKey, TokenCodec
from tests.integration.test_postgres_server import postgres_config
from tests.support.clients import Registry, Response, run_tool, skopeo
from tests.support.containerd import Containerd
from tests.support.images import make_oci_layout, tagged_digest
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]

SECRETS = {
    "root": "root-password",
    "alice": "alice-password",
    "ci": "ci-robot-secret",
    "puller": "puller-robot-secret",
}


def bhash(secret: str) -> str:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(6)).decode()


HASHES = {name: bhash(secret) for name, secret in SECRETS.items()}


def policy(extra_rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "version": 1,
        "admins": ["root"],
        "users": [{"name": "root", "password_hash": HASHES["root"]}],
        "robots": [
            {
                "name": "ci",
                "secret_hash": HASHES["ci"],
                "access": [{"repository": "team-a/**", "actions": ["pull", "push"]}],
            },
            {
                "name": "puller",
                "secret_hash": HASHES["puller"],
                "access": [{"repository": "team-a/api", "actions": ["pull"]}],
            },
        ],
        "rules": [
            {"repository": "team-a/*", "pull": ["alice"]},
            {"repository": "public/*", "anonymous_pull": True, "push": ["ci"]},
            *(extra_rules or []),
        ],
    }


def basic(name: str, secret: str | None = None) -> dict[str, str]:
    raw = f"{name}:{secret if secret is not None else SECRETS[name]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def creds(name: str) -> str:
    return f"{name}:{SECRETS[name]}"


@dataclass
class AuthRegistry:
    process: RegistryProcess
    api: Registry
    workdir: Path
    key: SigningKey

    @property
    def host(self) -> str:
        return self.process.host

    def set_policy(self, document: dict[str, Any] | str) -> None:
        """Publish a new policy the way kubelet updates a mounted ConfigMap: a symlink swap."""
        text = document if isinstance(document, str) else yaml.safe_dump(document)
        mount = self.workdir / "policy"
        version = mount / f"..{time.monotonic_ns()}"
        version.mkdir()
        (version / "policy.yaml").write_text(text)
        link = mount / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, mount / "..data")

    def token(self, scope: str, auth: dict[str, str] | None = None) -> str:
        query = f"/token?service=berth&scope={scope}"
        resp = self.api.get(query, headers=auth or {})
        assert resp.status == 200, resp
        token: str = resp.json()["token"]
        return token

    def tokens_issued(self) -> float:
        text = self.api.get("/metrics", headers=basic("root")).body.decode()
        m = re.search(r'^berth_auth_tokens_issued_total\{kind="access"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture
def auth_registry(registry_process: Start, tmp_path: Path) -> Iterator[AuthRegistry]:
    yield start_auth_registry(registry_process, tmp_path)


def start_auth_registry(
    registry_process: Start,
    tmp_path: Path,
    document: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> AuthRegistry:
    """A server with htpasswd, a policy file published like a mounted ConfigMap, tokens."""
    workdir = tmp_path / "auth"
    mount = workdir / "policy"
    mount.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = workdir / "token.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(f"alice:{HASHES['alice']}\n")
    holder = AuthRegistry(None, None, workdir, SigningKey.load(key_path))  # type: ignore[arg-type]
    holder.set_policy(document or policy())
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    process = registry_process(
        "berth",
        config={
            "auth": {
                "service": "berth",
                "issuer": "berth-test",
                "htpasswd": str(htpasswd),
                "policy": str(mount / "policy.yaml"),
                "signing_key": str(key_path),
                "failure_limit": 50,
            },
            "log": {"level": "info"},
            **(extra_config or {}),
        },
    )
    holder.process = process
    holder.api = Registry(process.url)
    return holder


def crane_as(registry: AuthRegistry, workdir: Path, account: str = "root") -> Callable[..., Any]:
    """crane with a Docker config of its own, logged in to ``registry`` as ``account``;
    call it with crane's arguments (``check=False`` to get a failed run back)."""
    env = {"DOCKER_CONFIG": str(workdir / f"docker-{account}")}

    def crane(*args: str | os.PathLike[str], check: bool = True) -> Any:
        return run_tool("crane", *args, "--insecure", env=env, check=check)

    crane("auth", "login", registry.host, "-u", account, "-p", SECRETS[account])
    return crane


def layout(tmp_path: Path, tag: str = "v1") -> tuple[Path, str]:
    path = tmp_path / f"layout-{tag}"
    digest = make_oci_layout(path, tag, layers=2, layer_size=4096)
    return path, digest


# --- challenges ------------------------------------------------------------------------------


def test_no_credentials_gets_the_bearer_challenge(auth_registry: AuthRegistry) -> None:
    resp = auth_registry.api.get("/v2/")
    assert resp.status == 401
    realm = f"http://{auth_registry.host}/token"
    assert resp.header("WWW-Authenticate") == f'Bearer realm="{realm}",service="berth"'
    resp = auth_registry.api.request("POST", "/v2/team-a/api/blobs/uploads/")
    assert resp.status == 401
    assert resp.header("WWW-Authenticate") == (
        f'Bearer realm="{realm}",service="berth",scope="repository:team-a/api:pull,push"'
    )
    assert resp.json()["errors"][0]["code"] == "UNAUTHORIZED"


# --- real clients through the token flow ---------------------------------------------------


def test_skopeo_with_creds(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    source, digest = layout(tmp_path)
    before = auth_registry.tokens_issued()
    ref = f"docker://{auth_registry.host}/team-a/api:v1"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", creds("ci"), f"oci:{source}:v1", ref)
    out = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", creds("alice"), ref)
    assert json.loads(out.stdout)["schemaVersion"] == 2
    pulled = tmp_path / "pulled"
    skopeo(
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--src-creds",
        creds("puller"),
        ref,
        f"oci:{pulled}:v1",
    )
    assert tagged_digest(pulled, "v1") == digest
    assert auth_registry.tokens_issued() >= before + 3  # each client went through /token


def test_skopeo_with_docker_config_authfile(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    """The same content a kubernetes.io/dockerconfigjson Secret holds."""
    authfile = tmp_path / "config.json"
    entry = {"auth": base64.b64encode(creds("ci").encode()).decode()}
    authfile.write_text(json.dumps({"auths": {auth_registry.host: entry}}))
    source, digest = layout(tmp_path)
    ref = f"docker://{auth_registry.host}/team-a/authfile:v1"
    before = auth_registry.tokens_issued()
    skopeo("copy", "--dest-tls-verify=false", "--dest-authfile", authfile, f"oci:{source}:v1", ref)
    pulled = tmp_path / "pulled"
    skopeo(
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--src-authfile",
        authfile,
        ref,
        f"oci:{pulled}:v1",
    )
    assert tagged_digest(pulled, "v1") == digest
    assert auth_registry.tokens_issued() > before


def test_crane_auth_login_push_pull(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    env = {"DOCKER_CONFIG": str(tmp_path / "docker")}

    def crane(*args: str | os.PathLike[str], check: bool = True) -> Any:
        return run_tool("crane", *args, "--insecure", env=env, check=check)

    crane("auth", "login", auth_registry.host, "-u", "ci", "-p", SECRETS["ci"])
    stored = json.loads((tmp_path / "docker" / "config.json").read_text())
    assert auth_registry.host in stored["auths"]
    source, digest = layout(tmp_path)
    ref = f"{auth_registry.host}/team-a/crane"
    before = auth_registry.tokens_issued()
    assert crane("push", source, f"{ref}:v1").stdout.strip() == f"{ref}@{digest}"
    assert crane("digest", f"{ref}:v1").stdout.strip() == digest
    crane("pull", "--format", "oci", f"{ref}:v1", tmp_path / "pulled")
    assert auth_registry.tokens_issued() > before
    # Logged out, the same pull is refused.
    crane("auth", "logout", auth_registry.host)
    failed = crane("digest", f"{ref}:v1", check=False)
    assert failed.returncode != 0
    assert "UNAUTHORIZED" in failed.stderr or "401" in failed.stderr


def test_oras_with_credentials(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
    (tmp_path / "notes.txt").write_text("signed, sealed, delivered\n")
    ref = f"{auth_registry.host}/team-a/artifact:v1"
    login = ["-u", "ci", "-p", SECRETS["ci"]]
    before = auth_registry.tokens_issued()
    run_tool(
        "oras", "push", "--plain-http", *login, ref, "notes.txt:text/plain", cwd=tmp_path, env=env
    )
    out = tmp_path / "out"
    out.mkdir()
    run_tool(
        "oras",
        "pull",
        "--plain-http",
        "-u",
        "alice",
        "-p",
        SECRETS["alice"],
        ref,
        cwd=out,
        env=env,
    )
    assert (out / "notes.txt").read_text() == "signed, sealed, delivered\n"
    assert auth_registry.tokens_issued() > before
    # Read-only alice cannot push.
    denied = run_tool(
        "oras",
        "push",
        "--plain-http",
        "-u",
        "alice",
        "-p",
        SECRETS["alice"],
        ref,
        "notes.txt:text/plain",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert denied.returncode != 0


def test_ctr_pulls_with_robot_credentials(
    auth_registry: AuthRegistry,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    """What a kubelet does with the pull secret the operator writes: containerd pulls."""
    source, digest = layout(tmp_path)
    ref = f"{auth_registry.host}/team-a/api:v1"
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        creds("ci"),
        f"oci:{source}:v1",
        f"docker://{ref}",
    )

    def ctr(*args: str, check: bool = True) -> Any:
        return containerd.run(*args, timeout=60, check=check)

    refused = ctr("images", "pull", "--plain-http", ref, check=False)
    assert refused.returncode != 0
    before = auth_registry.tokens_issued()
    ctr("images", "pull", "--plain-http", "--user", creds("puller"), ref)
    listed = ctr("images", "ls", "-q").stdout.split()
    assert ref in listed
    assert digest in ctr("images", "ls").stdout
    assert auth_registry.tokens_issued() > before


# --- refusals ---------------------------------------------------------------------------


def test_pull_only_robot_cannot_push_or_delete(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    source, digest = layout(tmp_path)
    ref = f"docker://{auth_registry.host}/team-a/api:v1"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", creds("ci"), f"oci:{source}:v1", ref)
    pushed = skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        creds("puller"),
        f"oci:{source}:v1",
        f"docker://{auth_registry.host}/team-a/api:v2",
        check=False,
    )
    assert pushed.returncode != 0
    assert "denied" in pushed.stderr.lower()
    deleted = skopeo("delete", "--tls-verify=false", "--creds", creds("puller"), ref, check=False)
    assert deleted.returncode != 0
    # Raw API, Basic and Bearer alike: 403 DENIED.
    api = auth_registry.api
    resp = api.request("DELETE", f"/v2/team-a/api/manifests/{digest}", headers=basic("puller"))
    assert resp.status == 403 and resp.json()["errors"][0]["code"] == "DENIED"
    token = auth_registry.token("repository:team-a/api:pull,push,delete", basic("puller"))
    resp = api.request("POST", "/v2/team-a/api/blobs/uploads/", headers=bearer(token))
    assert resp.status == 403
    assert api.get("/v2/team-a/api/manifests/v1", headers=bearer(token)).status == 200


def test_token_for_one_repository_is_refused_for_another(auth_registry: AuthRegistry) -> None:
    api = auth_registry.api
    token = auth_registry.token("repository:team-a/api:pull", basic("alice"))
    assert api.get("/v2/team-a/api/tags/list", headers=bearer(token)).status == 404
    resp = api.get("/v2/team-a/web/tags/list", headers=bearer(token))
    assert resp.status == 401
    assert 'error="insufficient_scope"' in (resp.header("WWW-Authenticate") or "")
    assert 'scope="repository:team-a/web:pull"' in (resp.header("WWW-Authenticate") or "")
    assert api.get("/v2/team-b/api/tags/list", headers=bearer(token)).status == 403


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_forged_tokens_are_refused(auth_registry: AuthRegistry) -> None:
    api = auth_registry.api
    wanted = [Access.repository("team-a/api", "pull")]
    ours = TokenCodec(auth_registry.key, "berth-test")
    good = ours.issue("alice", "berth", 60, wanted)[0]
    path = "/v2/team-a/api/tags/list"
    assert api.get(path, headers=bearer(good)).status == 404

    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["access"][0]["name"] = "team-b/api"
    none_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    forged: dict[str, str] = {
        "tampered": f"{header}.{_b64(json.dumps(claims).encode())}.{signature}",
        "alg none": f"{none_header}.{payload}.",
        "expired": TokenCodec(auth_registry.key, "berth-test", lambda: time.time() - 3600).issue(
            "alice", "berth", 60, wanted
        )[0],
        "wrong audience": ours.issue("alice", "another-registry", 60, wanted)[0],
        "wrong issuer": TokenCodec(auth_registry.key, "mallory").issue(
            "alice", "berth", 60, wanted
        )[0],
        "other key": TokenCodec(SigningKey.generate(), "berth-test").issue(
            "alice", "berth", 60, wanted
        )[0],
    }
    for name, token in forged.items():
        resp = api.get(
            path if name != "tampered" else "/v2/team-b/api/tags/list", headers=bearer(token)
        )
        assert resp.status == 401, name
        assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or ""), name
    metrics = api.get("/metrics", headers=basic("root")).body.decode()
    assert re.search(r'berth_auth_failures_total\{reason="invalid_token"\} ([6-9]|\d\d)', metrics)


def test_anonymous_pull_only_where_allowed(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    source, _ = layout(tmp_path)
    for repo in ("public/tool", "team-a/api"):
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            creds("ci"),
            f"oci:{source}:v1",
            f"docker://{auth_registry.host}/{repo}:v1",
        )
    public = f"docker://{auth_registry.host}/public/tool:v1"
    out = skopeo("inspect", "--raw", "--tls-verify=false", "--no-creds", public)
    assert json.loads(out.stdout)["schemaVersion"] == 2
    private = f"docker://{auth_registry.host}/team-a/api:v1"
    refused = skopeo("inspect", "--raw", "--tls-verify=false", "--no-creds", private, check=False)
    assert refused.returncode != 0
    api = auth_registry.api
    assert api.get("/v2/public/tool/manifests/v1").status == 200
    assert api.get("/v2/team-a/api/manifests/v1").status == 401
    assert api.request("POST", "/v2/public/tool/blobs/uploads/").status == 401


def test_catalog_hides_what_the_caller_cannot_pull(
    auth_registry: AuthRegistry, tmp_path: Path
) -> None:
    api = auth_registry.api
    for repo in ("team-a/api", "team-a/web", "team-b/secret", "public/tool"):
        api.default_headers = basic("root")
        api.push_image(repo, "v1")
    api.default_headers = {}

    def catalog(headers: dict[str, str]) -> list[str]:
        resp: Response = api.get("/v2/_catalog", headers=headers)
        assert resp.status == 200, resp
        repositories: list[str] = resp.json()["repositories"]
        return repositories

    everything = ["public/tool", "team-a/api", "team-a/web", "team-b/secret"]
    assert catalog(basic("root")) == everything
    assert catalog(basic("alice")) == ["public/tool", "team-a/api", "team-a/web"]
    assert catalog(basic("puller")) == ["public/tool", "team-a/api"]
    assert catalog({}) == ["public/tool"]
    env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
    run_tool(
        "crane",
        "auth",
        "login",
        auth_registry.host,
        "-u",
        "alice",
        "-p",
        SECRETS["alice"],
        "--insecure",
        env=env,
    )
    listed = run_tool("crane", "catalog", auth_registry.host, "--insecure", env=env)
    assert listed.stdout.split() == ["public/tool", "team-a/api", "team-a/web"]


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout}s")


def test_policy_change_takes_effect_while_running(auth_registry: AuthRegistry) -> None:
    api = auth_registry.api

    def alice_may_push() -> bool:
        resp = api.request("POST", "/v2/team-b/new/blobs/uploads/", headers=basic("alice"))
        return resp.status == 202

    assert not alice_may_push()
    auth_registry.set_policy(policy([{"repository": "team-b/*", "push": ["alice"]}]))
    print(f"\npolicy change in force after {_wait_for(alice_may_push):.2f}s")

    # A malformed policy is rejected; the one in force stays.
    auth_registry.set_policy("rules: [{repository: team-b/*, push: alice")
    _wait_for(lambda: "auth file rejected" in auth_registry.process.log_tail(400))
    assert alice_may_push()

    # Revocation applies to tokens issued before it too.
    token = auth_registry.token("repository:team-b/new:pull,push", basic("alice"))
    resp = api.request("POST", "/v2/team-b/new/blobs/uploads/", headers=bearer(token))
    assert resp.status == 202
    auth_registry.set_policy(policy())
    _wait_for(lambda: not alice_may_push())
    resp = api.request("POST", "/v2/team-b/new/blobs/uploads/", headers=bearer(token))
    assert resp.status == 403


def test_repeated_failures_are_rate_limited(registry_process: Start, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{HASHES['alice']}\n")
    process = registry_process(
        "berth",
        config={
            "auth": {"htpasswd": str(htpasswd), "failure_limit": 3, "failure_window_seconds": 30}
        },
    )
    api = Registry(process.url)
    for _ in range(3):
        assert api.get("/v2/", headers=basic("alice", "guess")).status == 401
    resp = api.get("/v2/", headers=basic("alice"))
    assert resp.status == 429
    assert 1 <= int(resp.header("Retry-After") or "0") <= 30
    log = process.log_tail(200)
    assert "authentication failed" in log and "guess" not in log
    assert SECRETS["alice"] not in log


def test_replicas_limit_failures_as_one(
    registry_process: Start, postgres_dsn: str, tmp_path: Path
) -> None:
    """Two replicas on one PostgreSQL database: failures spread over both (two here, one
    there, each under the limit of 3) lock the client on both once they have synced."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{HASHES['alice']}\n")
    key_path = tmp_path / "token.key"
    key_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = {
        **postgres_config(postgres_dsn, tmp_path),
        "auth": {
            "htpasswd": str(htpasswd),
            "signing_key": str(key_path),
            "failure_limit": 3,
            "failure_window_seconds": 60,
        },
    }
    first, second = (Registry(registry_process("berth", config=config).url) for _ in range(2))
    for api in (first, second, first):
        assert api.get("/v2/", headers=basic("alice", "guess")).status == 401
    # Each process shares what it saw, and takes in the others', every second.
    deadline = time.monotonic() + 10
    for api in (second, first):
        while (resp := api.get("/v2/", headers=basic("alice"))).status != 429:
            assert time.monotonic() < deadline, "the replicas never limited the client together"
            time.sleep(0.2)
        assert 1 <= int(resp.header("Retry-After") or "0") <= 60
