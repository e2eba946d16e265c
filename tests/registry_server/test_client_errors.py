"""Client errors are 4xx in the spec's format, never 500, and use only the spec's codes.

Header values reach the server as text decoded by the HTTP parser: bytes that are not
UTF-8 arrive as surrogate escapes (``\\udcff``), and non-ASCII letters or digits as
themselves. Every decoder of such a value (Authorization, Content-Range, Range, the
replication version headers, query numbers) must refuse them as a client error. The
wire-level cases (raw bytes, requests the HTTP parser refuses) are in
tests/integration/test_hostile_input.py.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from registry_server.app import build_app
from registry_server.auth import configured
from registry_server.auth.model import Access
from registry_server.auth.tokens import SigningKey, TokenCodec, TokenInvalid
from registry_server.config import AuthConfig, Config, StorageConfig
from registry_server.protocol import errors, pagination, ranges, versions
from tests.support.clients import SPEC_CODES

SERVER_ROOT = Path(__file__).resolve().parents[2] / "registry_server"
CATALOGUE = SERVER_ROOT / "protocol" / "errors.py"

# What the parser makes of undecodable bytes, and of decodable but non-ASCII text.
UNDECODABLE = "\udcff\udcfe"
NON_ASCII = ["\udcff", "é", "\u0661\u0662", "\u0660-\u0669"]


# -- the catalogue ------------------------------------------------------------------------


def test_every_declared_error_uses_a_spec_code() -> None:
    """Client errors use the spec's codes; the server's own faults (5xx) use Docker's
    UNKNOWN, since the spec's list has no code for them."""
    declared = {n: v for n, v in vars(errors).items() if isinstance(v, errors.ErrorCode)}
    assert declared
    client = {n: v for n, v in declared.items() if v.status < 500}
    assert {n: v.code for n, v in client.items() if v.code not in SPEC_CODES} == {}
    assert {n: v.status for n, v in declared.items() if not 400 <= v.status < 600} == {}
    server = {n: v.code for n, v in declared.items() if v.status >= 500}
    assert set(server.values()) <= SPEC_CODES | {"UNKNOWN"}, server


def test_error_codes_are_declared_only_in_the_catalogue() -> None:
    found = []
    for path in sorted(SERVER_ROOT.rglob("*.py")):
        if path == CATALOGUE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "ErrorCode":
                    found.append(f"{path.relative_to(SERVER_ROOT)}:{node.lineno}")
    assert found == []


# -- header and query decoders ------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["bytes=\u0660-\u0669", "bytes=0-\udcff", "bytes=\udcff-", "bytes=-\u0661"]
)
def test_range_with_non_ascii_is_unsatisfiable(value: str) -> None:
    assert ranges.parse_range(value, 100) is None


@pytest.mark.parametrize(
    "value", ["\u0660-\u0669", "0-\udcff", "bytes \u0660-9/10", "0-9/\u0661\u0660"]
)
def test_content_range_with_non_ascii_is_416(value: str) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        ranges.parse_content_range(value)
    assert exc.value.status == 416


@pytest.mark.parametrize(
    ("version", "origin"),
    [
        ("\u0661\u0662", "eu"),  # non-ASCII digits
        ("1_000", "eu"),  # Python's int() syntax is not the header's
        (" 12", "eu"),
        ("\udcff", "eu"),
        (str(1 << 63), "eu"),  # beyond what the index stores
        ("12", UNDECODABLE),
        ("12", "é"),
        ("12", "e u"),
    ],
)
def test_replication_stamp_headers_must_be_ascii_and_bounded(version: str, origin: str) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        versions.from_headers(version, origin)
    assert exc.value.status == 400


def test_replication_stamp_headers_accept_the_largest_version() -> None:
    assert versions.from_headers(str((1 << 63) - 1), "eu-west") == versions.Stamp(
        (1 << 63) - 1, "eu-west"
    )


@pytest.mark.parametrize("value", ["\u0661", "\u0663\u0660", "1_0", " 5", "+5", "\udcff"])
def test_page_size_must_be_ascii_digits(value: str) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        pagination.parse_n(value)
    assert exc.value.status == 400
    assert exc.value.error.code in SPEC_CODES


@pytest.mark.parametrize(
    "credentials",
    [
        UNDECODABLE,
        "é",
        "YWxp\udcffY2U6cHc=",
        base64.b64encode(b"al\xffce:pw").decode(),  # base64 of bytes that are not UTF-8
    ],
)
def test_basic_credentials_that_do_not_decode_are_malformed(credentials: str) -> None:
    assert configured.decode_basic(credentials) is None


@pytest.mark.parametrize(
    "token", [UNDECODABLE, "\udcff.\udcfe.x", "é.é.é", "eyJhbGciOiJFUzI1NiJ9.\udcff.x"]
)
def test_tokens_that_do_not_decode_are_invalid(token: str) -> None:
    codec = TokenCodec(SigningKey.generate(), "berth")
    with pytest.raises(TokenInvalid):
        codec.verify(token, "berth")


@pytest.fixture
def authorizer(tmp_path: Path) -> configured.ConfiguredAuthorizer:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}\n")
    return configured.build(AuthConfig(htpasswd=htpasswd, failure_limit=0), "")


@pytest.mark.parametrize(
    "header",
    [
        f"Basic {UNDECODABLE}",
        "Basic é",
        "Bearer " + UNDECODABLE,
        "Bearer é.é.é",
        f"{UNDECODABLE} abc",
        "Basic " + base64.b64encode(b"alice:p\xff").decode(),
    ],
)
@pytest.mark.parametrize("wanted", [[], [Access.repository("a/b", "pull")]])
async def test_undecodable_authorization_is_401(
    authorizer: configured.ConfiguredAuthorizer, header: str, wanted: list[Access]
) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        await authorizer.authorize(header, "client", wanted)
    assert exc.value.error is errors.UNAUTHORIZED
    assert exc.value.headers["WWW-Authenticate"].startswith("Bearer ")


# -- through the application --------------------------------------------------------------

Client = TestClient[Any, Any]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    app = build_app(Config(storage=StorageConfig(root=tmp_path)))
    async with TestClient(TestServer(app)) as client:
        yield client


async def _error(client: Client, method: str, path: str, status: int, **kw: Any) -> str:
    response = await client.request(method, path, **kw)
    text = await response.text()
    assert response.status == status, (method, path, text)
    assert response.content_type == "application/json", (method, path, text)
    code: str = (await response.json())["errors"][0]["code"]
    assert code in SPEC_CODES, (method, path, text)
    return code


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2//manifests/x"),
        ("PUT", "/v2//manifests/x"),
        ("GET", "/v2//tags/list"),
        ("POST", "/v2//blobs/uploads/"),
        ("GET", "/v2/manifests/x"),
        ("GET", "/v2//referrers/sha256:" + "a" * 64),
    ],
)
async def test_empty_repository_name_is_name_invalid(
    client: Client, method: str, path: str
) -> None:
    assert await _error(client, method, path, 400) == "NAME_INVALID"


@pytest.mark.parametrize(
    "digest", ["", "sha256:abc%2Fdef", "sha256:" + "a" * 64 + "/x", "%2F", "a/b/c"]
)
async def test_malformed_referrers_digest_is_digest_invalid(client: Client, digest: str) -> None:
    assert await _error(client, "GET", f"/v2/a/b/referrers/{digest}", 400) == "DIGEST_INVALID"


async def test_repository_named_like_an_operation_still_routes(client: Client) -> None:
    """The lenient referrers pattern must not take paths other routes serve."""
    response = await client.get("/v2/a/referrers/b/tags/list")
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"


@pytest.mark.parametrize("query", ["n=x", "n=-1", "n=%D9%A1", "last=%00", "n=1&last=a%00b"])
async def test_pagination_errors_use_a_spec_code(client: Client, query: str) -> None:
    await _error(client, "GET", f"/v2/_catalog?{query}", 400)
    await _error(client, "GET", f"/v2/a/tags/list?{query}", 400)


async def _push(client: Client, repo: str, tag: str, extra: dict[str, Any] | None = None) -> str:
    config = b"{}"
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    put = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", data=config)
    assert put.status == 201, await put.text()
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": digest,
                "size": 2,
            },
            "layers": [],
            **(extra or {}),
        }
    ).encode()
    put = await client.put(
        f"/v2/{repo}/manifests/{tag}",
        data=body,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert put.status == 201, await put.text()
    return str(put.headers["Docker-Content-Digest"])


async def test_no_link_to_an_empty_page_and_no_filter_said_for_an_empty_one(
    client: Client,
) -> None:
    """A full last page has no next (found by review: it linked to an empty page), and
    n=0000000000 is n=0 (it was a page of 10,000)."""
    for tag in ("a", "b"):
        subject = await _push(client, "r", tag)
    for path, n, more in (
        ("/v2/r/tags/list", 2, False),
        ("/v2/r/tags/list", 1, True),
        ("/v2/_catalog", 1, False),
    ):
        page = await client.get(f"{path}?n={n}")
        assert page.status == 200
        assert ("Link" in page.headers) is more, (path, n, page.headers.get("Link"))
    page = await client.get("/v2/r/tags/list?n=0000000000")
    assert (await page.json())["tags"] == [] and "Link" not in page.headers
    await _push(
        client,
        "r",
        "sig",
        {
            "subject": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": subject,
                "size": 1,
            },
            "artifactType": "application/x-sig",
        },
    )
    listed = await client.get(f"/v2/r/referrers/{subject}?artifactType=")
    assert "OCI-Filters-Applied" not in listed.headers
    assert len((await listed.json())["manifests"]) == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/v2/a/b/nope", 404),
        ("POST", "/v2/_catalog", 405),
        ("DELETE", "/token", 405),
        ("PUT", "/healthz", 405),
        ("POST", "/metrics", 405),
        ("GET", "/berth/v1/nope", 404),
    ],
)
async def test_unknown_routes_and_methods_answer_in_the_spec_format(
    client: Client, method: str, path: str, status: int
) -> None:
    await _error(client, method, path, status)


async def test_method_not_allowed_says_what_is(client: Client) -> None:
    response = await client.post("/v2/_catalog")
    assert response.status == 405
    assert response.headers["Allow"] == "GET"


async def test_a_replicated_change_stamped_far_in_the_future_is_refused(client: Client) -> None:
    ahead = versions.tick(0, int((time.time() + 3600) * 1000))
    reply = await client.put(
        "/v2/r/manifests/latest",
        data=b"{}",
        headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            versions.VERSION_HEADER: str(ahead),
            versions.ORIGIN_HEADER: "us",
        },
    )
    assert reply.status == 503  # the sender waits: the change is not dropped
    assert reply.headers["Retry-After"] == "30"
    assert "ahead of this region's" in await reply.text()
