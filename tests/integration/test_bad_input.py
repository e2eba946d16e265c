"""Bad input against a real berth process, over raw HTTP.

Every rejection must be the spec's error (`{"errors": [{"code", "message", ...}]}` with the
right status) and must leave storage as it was: the catalog, tag lists and tag digests a
client sees are unchanged, and no file appears under `<root>/blobs` for rejected content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import (
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    assert_error,
    blob_file,
    blob_files,
    blob_tree_problems,
    canonical_json,
    image_index,
    image_manifest,
    raw_replies,
    request_bytes,
    send_truncated,
    sha256,
    wait_for,
    with_query,
)
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]

SEED_REPO = "seed/app"


@pytest.fixture
def registry(registry_process: Start) -> RegistryProcess:
    return registry_process("berth")


@pytest.fixture
def api(registry: RegistryProcess) -> Registry:
    api = Registry(registry.url)
    # Some content, so "unchanged" compares a non-empty state.
    api.push_image(SEED_REPO, "v1", [b"seed layer"])
    return api


@contextmanager
def unchanged(api: Registry, root: Path, *repos: str) -> Iterator[None]:
    """The block must leave what clients see, and the blob files, exactly as they were:
    catalog, tags and their digests, blob HEAD in each repository, files under blobs/."""

    def blob_heads() -> dict[tuple[str, str], bool]:
        stored = [f"{p.parents[2].name}:{p.parent.name}" for p in blob_files(root)]
        return {(r, d): api.blob_exists(r, d) for r in (SEED_REPO, *repos) for d in stored}

    before = api.snapshot([SEED_REPO, *repos])
    files = blob_files(root)
    heads = blob_heads()
    yield
    assert api.snapshot([SEED_REPO, *repos]) == before
    assert blob_files(root) == files
    assert blob_heads() == heads
    assert blob_tree_problems(root) == []


def _uploads(root: Path) -> list[str]:
    directory = root / "uploads"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- digests and sizes -------------------------------------------------------------------


def test_digest_mismatch_on_monolithic_put(api: Registry, registry: RegistryProcess) -> None:
    data, other = b"the real content", b"something else"
    with unchanged(api, registry.root, "up/mismatch"):
        location = api.start_upload("up/mismatch")
        response = api.finish(location, sha256(other), data)
        assert_error(response, 400, "DIGEST_INVALID")
        assert not api.blob_exists("up/mismatch", sha256(data))
        assert not api.blob_exists("up/mismatch", sha256(other))
    assert not blob_file(registry.root, sha256(data)).exists()
    assert not blob_file(registry.root, sha256(other)).exists()


def test_digest_mismatch_on_single_post(api: Registry, registry: RegistryProcess) -> None:
    data = b"single post body"
    with unchanged(api, registry.root, "up/single"):
        response = api.request(
            "POST",
            f"/v2/up/single/blobs/uploads/?digest={sha256(b'not it')}",
            data,
            {"Content-Type": "application/octet-stream"},
        )
        assert_error(response, 400, "DIGEST_INVALID")
    assert not blob_file(registry.root, sha256(data)).exists()
    # The one-shot session is not left behind.
    assert _uploads(registry.root) == []


def test_digest_mismatch_after_chunks(api: Registry, registry: RegistryProcess) -> None:
    with unchanged(api, registry.root, "up/chunks"):
        location = api.start_upload("up/chunks")
        assert api.patch(location, b"first,", 0).status == 202
        assert api.patch(location, b"second", 6).status == 202
        response = api.finish(location, sha256(b"first,third"))
        assert_error(response, 400, "DIGEST_INVALID")
    assert not blob_file(registry.root, sha256(b"first,second")).exists()


def test_digest_of_manifest_put_by_digest_must_match(
    api: Registry, registry: RegistryProcess
) -> None:
    api.push_blob("man/bydigest", b"{}")
    manifest = image_manifest(b"{}", [])
    with unchanged(api, registry.root, "man/bydigest"):
        response = api.put_manifest("man/bydigest", sha256(manifest + b" "), manifest)
        assert_error(response, 400, "DIGEST_INVALID")


def test_content_range_disagreeing_with_content_length(
    api: Registry, registry: RegistryProcess
) -> None:
    with unchanged(api, registry.root, "up/range"):
        location = api.start_upload("up/range")
        assert api.patch(location, b"0123456789", 0).status == 202
        response = api.request(
            "PATCH",
            location,
            b"abcde",
            {"Content-Range": "10-19", "Content-Type": "application/octet-stream"},
        )
        assert_error(response, 416, "BLOB_UPLOAD_INVALID")
        assert api.get(location).header("Range") == "0-9"
    # The session still completes with the right bytes.
    assert api.patch(location, b"abcdefghij", 10).status == 202
    assert api.finish(location, sha256(b"0123456789abcdefghij")).status == 201
    assert api.blob("up/range", sha256(b"0123456789abcdefghij")) == b"0123456789abcdefghij"


def test_final_put_whose_content_range_disagrees_with_its_body(
    api: Registry, registry: RegistryProcess
) -> None:
    """A size mismatch is refused even when the digest would match what was actually sent."""
    head, tail = b"0123456789", b"abcde"
    with unchanged(api, registry.root, "up/putrange"):
        location = api.start_upload("up/putrange")
        assert api.patch(location, head, 0).status == 202
        response = api.request(
            "PUT",
            with_query(location, digest=sha256(head + tail)),
            tail,
            {"Content-Range": "10-19", "Content-Type": "application/octet-stream"},
        )
        assert_error(response, 416, "BLOB_UPLOAD_INVALID")
        assert api.get(location).header("Range") == "0-9"
    assert not blob_file(registry.root, sha256(head + tail)).exists()


@pytest.mark.parametrize("actual", [5, 15], ids=["shorter", "longer"])
def test_chunked_body_disagreeing_with_content_range(
    api: Registry, registry: RegistryProcess, actual: int
) -> None:
    """Without Content-Length the mismatch shows only while streaming; the chunk is undone."""
    head, chunk = b"0123456789", bytes(range(actual))
    with unchanged(api, registry.root, "up/chunkedrange"):
        location = api.start_upload("up/chunkedrange")
        assert api.patch(location, head, 0).status == 202
        response = api.request(
            "PATCH",
            location,
            iter([chunk[:3], chunk[3:]]),
            {"Content-Range": "10-19", "Content-Type": "application/octet-stream"},
        )
        assert_error(response, response.status, {"SIZE_INVALID", "BLOB_UPLOAD_INVALID"})
        assert response.status in (400, 416), response
        assert api.get(location).header("Range") == "0-9"
    assert api.patch(location, b"x" * 10, 10).status == 202
    assert api.finish(location, sha256(head + b"x" * 10)).status == 201


def test_content_length_shorter_than_body(api: Registry, registry: RegistryProcess) -> None:
    """Bytes past Content-Length are not part of the blob (they are a malformed next request)."""
    data = b"x" * 100
    with unchanged(api, registry.root, "up/short"):
        location = api.start_upload("up/short")
        raw = request_bytes(
            registry.url,
            "PUT",
            with_query(location, digest=sha256(data)),
            {"Content-Length": "90", "Content-Type": "application/octet-stream"},
            data,
        )
        replies = raw_replies(registry.url, raw)
        # The blob request fails its digest check, the trailing bytes are a bad request
        # (which may end the connection before the first reply): nothing is created.
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", replies), replies
        assert b" 201 " not in replies, replies
        assert api.get("/v2/").status == 200
    assert not blob_file(registry.root, sha256(data)).exists()
    assert not blob_file(registry.root, sha256(data[:90])).exists()


# -- truncated bodies ---------------------------------------------------------------------


def test_truncated_chunk_keeps_the_session_offset(api: Registry, registry: RegistryProcess) -> None:
    first, second = b"A" * 1000, bytes(range(256)) * 64
    with unchanged(api, registry.root, "up/trunc"):
        location = api.start_upload("up/trunc")
        assert api.patch(location, first, 0).status == 202
        send_truncated(
            registry.url,
            "PATCH",
            location,
            {
                "Content-Length": str(len(second)),
                "Content-Range": f"{len(first)}-{len(first) + len(second) - 1}",
                "Content-Type": "application/octet-stream",
            },
            second[: len(second) // 2],
        )
        # The half-written chunk is undone: the offset is what the client last saw.
        wait_for(lambda: api.get(location).header("Range") == f"0-{len(first) - 1}")
        assert not blob_file(registry.root, sha256(first + second)).exists()
    # Resuming at that offset completes the blob correctly.
    assert api.patch(location, second, len(first)).status == 202
    assert api.finish(location, sha256(first + second)).status == 201
    assert api.blob("up/trunc", sha256(first + second)) == first + second


def test_truncated_monolithic_put(api: Registry, registry: RegistryProcess) -> None:
    data = bytes(range(256)) * 256
    with unchanged(api, registry.root, "up/truncput"):
        location = api.start_upload("up/truncput")
        send_truncated(
            registry.url,
            "PUT",
            with_query(location, digest=sha256(data)),
            {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"},
            data[:1000],
        )
        wait_for(lambda: api.get(location).header("Range") == "0-0")
        assert not api.blob_exists("up/truncput", sha256(data))
    assert not blob_file(registry.root, sha256(data)).exists()
    # The session was not consumed: the full body still completes it.
    assert api.finish(location, sha256(data), data).status == 201
    assert api.blob("up/truncput", sha256(data)) == data


def test_truncated_single_post(api: Registry, registry: RegistryProcess) -> None:
    data = bytes(range(256)) * 256
    with unchanged(api, registry.root, "up/truncpost"):
        send_truncated(
            registry.url,
            "POST",
            f"/v2/up/truncpost/blobs/uploads/?digest={sha256(data)}",
            {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"},
            data[:1000],
        )
        wait_for(lambda: _uploads(registry.root) == [])
        assert not api.blob_exists("up/truncpost", sha256(data))
    assert not blob_file(registry.root, sha256(data)).exists()


def test_truncated_manifest(api: Registry, registry: RegistryProcess) -> None:
    api.push_blob("man/trunc", b"{}")
    manifest = image_manifest(b"{}", [])
    with unchanged(api, registry.root, "man/trunc"):
        send_truncated(
            registry.url,
            "PUT",
            "/v2/man/trunc/manifests/v1",
            {"Content-Length": str(len(manifest)), "Content-Type": OCI_MANIFEST},
            manifest[: len(manifest) // 2],
        )
        assert api.get("/v2/").status == 200
        assert_error(api.manifest("man/trunc", "v1"), 404, "MANIFEST_UNKNOWN")


# -- manifests ----------------------------------------------------------------------------


def _config_and_layer(api: Registry, repo: str) -> tuple[bytes, bytes]:
    config, layer = b'{"architecture":"amd64","os":"linux"}', b"layer bytes"
    api.push_blob(repo, config)
    api.push_blob(repo, layer)
    return config, layer


def _good_manifest(config: bytes, layer: bytes) -> dict[str, Any]:
    return json.loads(image_manifest(config, [layer]))  # type: ignore[no-any-return]


MALFORMED: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "not-json": lambda m: b"{not json",
    "truncated-json": lambda m: canonical_json(m)[:-5],
    "json-array": lambda m: b"[]",
    "json-string": lambda m: b'"manifest"',
    "not-utf8": lambda m: b'{"schemaVersion": 2, "x": "\xff\xfe"}',
    "empty-body": lambda m: b"",
    "schema-version-1": lambda m: canonical_json({**m, "schemaVersion": 1}),
    "schema-version-missing": lambda m: canonical_json(
        {k: v for k, v in m.items() if k != "schemaVersion"}
    ),
    "config-missing": lambda m: canonical_json({k: v for k, v in m.items() if k != "config"}),
    "layers-not-array": lambda m: canonical_json({**m, "layers": {"a": 1}}),
    "layer-not-object": lambda m: canonical_json({**m, "layers": ["sha256:abc"]}),
    "layer-bad-digest": lambda m: canonical_json(
        {**m, "layers": [{**m["layers"][0], "digest": "sha256:xyz"}]}
    ),
    "layer-negative-size": lambda m: canonical_json(
        {**m, "layers": [{**m["layers"][0], "size": -1}]}
    ),
    "layer-size-string": lambda m: canonical_json(
        {**m, "layers": [{**m["layers"][0], "size": "10"}]}
    ),
    "annotations-not-strings": lambda m: canonical_json({**m, "annotations": {"a": 1}}),
    "image-with-manifests-field": lambda m: canonical_json({**m, "manifests": []}),
    # Deep nesting overflows a recursive JSON parser: still a bad manifest, not a 500.
    "deeply-nested-array": lambda m: b"[" * 100_000 + b"]" * 100_000,
    "deeply-nested-annotation": lambda m: (
        canonical_json(m)[:-1] + b',"x":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest(api: Registry, registry: RegistryProcess, case: str) -> None:
    config, layer = _config_and_layer(api, "man/bad")
    body = MALFORMED[case](_good_manifest(config, layer))
    with unchanged(api, registry.root, "man/bad"):
        response = api.put_manifest("man/bad", "v1", body, OCI_MANIFEST)
        assert_error(response, 400, "MANIFEST_INVALID")
        assert_error(api.manifest("man/bad", "v1"), 404, "MANIFEST_UNKNOWN")
    # The well-formed manifest over the same blobs is accepted: the rejection was the body.
    api.push_manifest("man/bad", "v1", image_manifest(config, [layer]))


@pytest.mark.parametrize(
    ("content_type", "body_type"),
    [
        ("application/vnd.example.unknown+json", None),
        ("application/vnd.example.unknown+json", "application/vnd.example.unknown+json"),
        (OCI_MANIFEST, "application/vnd.example.unknown+json"),
        ("application/vnd.docker.distribution.manifest.v1+prettyjws", None),
        (OCI_INDEX, OCI_MANIFEST),  # body and header disagree
    ],
    ids=["header-only", "both", "body-only", "docker-schema1", "mismatch"],
)
def test_manifest_of_unknown_media_type(
    api: Registry, registry: RegistryProcess, content_type: str, body_type: str | None
) -> None:
    config, layer = _config_and_layer(api, "man/type")
    doc = _good_manifest(config, layer)
    if body_type is None:
        doc.pop("mediaType")
    else:
        doc["mediaType"] = body_type
    with unchanged(api, registry.root, "man/type"):
        response = api.put_manifest("man/type", "v1", canonical_json(doc), content_type)
        assert_error(response, 400, "MANIFEST_INVALID")


def test_manifest_referencing_missing_blob(api: Registry, registry: RegistryProcess) -> None:
    config, layer = _config_and_layer(api, "man/missing")
    absent = b"never pushed"
    # A blob that only another repository holds is missing here too.
    api.push_blob("man/elsewhere", b"elsewhere only")
    for layers in ([layer, absent], [b"elsewhere only"]):
        manifest = image_manifest(config, layers)
        with unchanged(api, registry.root, "man/missing"):
            response = api.put_manifest("man/missing", "v1", manifest)
            payload = assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
            assert sha256(layers[-1]) in json.dumps(payload)
    missing_config = image_manifest(b"no such config", [layer])
    with unchanged(api, registry.root, "man/missing"):
        assert_error(
            api.put_manifest("man/missing", "v1", missing_config), 400, "MANIFEST_BLOB_UNKNOWN"
        )


def test_index_referencing_missing_child(api: Registry, registry: RegistryProcess) -> None:
    config, layer = _config_and_layer(api, "man/index")
    present = image_manifest(config, [layer])
    api.push_manifest("man/index", sha256(present), present)
    absent = image_manifest(config, [layer], annotations={"absent": "yes"})
    index = image_index([present, absent])
    with unchanged(api, registry.root, "man/index"):
        payload = assert_error(
            api.put_manifest("man/index", "v1", index, OCI_INDEX), 400, "MANIFEST_BLOB_UNKNOWN"
        )
        assert sha256(absent) in json.dumps(payload)
        assert_error(
            api.put_manifest("man/index", sha256(index), index, OCI_INDEX),
            400,
            "MANIFEST_BLOB_UNKNOWN",
        )
    # With the child pushed, the same index is accepted.
    api.push_manifest("man/index", sha256(absent), absent)
    api.push_manifest("man/index", "v1", index, OCI_INDEX)


def test_oversized_manifest_is_413(registry_process: Start) -> None:
    limit = 2048
    registry = registry_process("berth", config={"limits": {"max_manifest_bytes": limit}})
    api = Registry(registry.url)
    api.push_image(SEED_REPO, "v1", [b"seed layer"])
    config = b"{}"
    api.push_blob("man/big", config)

    def padded(size: int) -> bytes:
        base = image_manifest(config, [], annotations={"pad": ""})
        body = image_manifest(config, [], annotations={"pad": "x" * (size - len(base))})
        assert len(body) == size
        return body

    with unchanged(api, registry.root, "man/big"):
        # Declared up front (Content-Length) ...
        response = api.put_manifest("man/big", "v1", padded(limit + 1))
        assert_error(response, 413)
        # ... or only discovered while streaming (chunked transfer encoding).
        big = padded(4 * limit)
        response = api.request(
            "PUT",
            "/v2/man/big/manifests/v1",
            (big[i : i + 512] for i in range(0, len(big), 512)),
            {"Content-Type": OCI_MANIFEST},
        )
        assert_error(response, 413)
    # Exactly at the limit is fine.
    api.push_manifest("man/big", "v1", padded(limit))


# -- names, tags, digests -----------------------------------------------------------------

BAD_NAMES = {
    "dot-dot": "../x",
    "encoded-dot-dot": "%2e%2e/x",
    "inner-dot-dot": "a/../x",
    "upper-case": "Team/App",
    "too-long": "a" * 256,
    "too-long-components": "/".join(["abcdefghijklmnopq"] * 16)[:256].rstrip("/") + "x",
    "empty-component": "a//b",
    "trailing-slash": "a/",
    "leading-separator": "-a/b",
    "component-leading-dot": "a/.b",
    "space": "a%20b",
    "encoded-slash-dot-dot": "a%2F..%2Fb",
    "nul": "a%00b",
}


def _name_endpoints(name: str) -> list[tuple[str, str]]:
    digest = sha256(b"whatever")
    return [
        ("GET", f"/v2/{name}/tags/list"),
        ("GET", f"/v2/{name}/manifests/v1"),
        ("HEAD", f"/v2/{name}/manifests/v1"),
        ("PUT", f"/v2/{name}/manifests/v1"),
        ("DELETE", f"/v2/{name}/manifests/v1"),
        ("GET", f"/v2/{name}/blobs/{digest}"),
        ("DELETE", f"/v2/{name}/blobs/{digest}"),
        ("POST", f"/v2/{name}/blobs/uploads/"),
        ("POST", f"/v2/{name}/blobs/uploads/?digest={digest}"),
        ("GET", f"/v2/{name}/referrers/{digest}"),
    ]


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_invalid_repository_names(api: Registry, registry: RegistryProcess, case: str) -> None:
    name = BAD_NAMES[case]
    assert len(name) > 255 or case != "too-long"
    with unchanged(api, registry.root):
        for method, path in _name_endpoints(name):
            body = image_manifest(b"{}", []) if method == "PUT" else None
            response = api.request(method, path, body, {"Content-Type": OCI_MANIFEST})
            if method == "HEAD":
                assert response.status == 400, (method, path, response)
            else:
                assert_error(response, 400, "NAME_INVALID")
        assert _uploads(registry.root) == []


def test_longest_valid_name_is_accepted(api: Registry) -> None:
    name = "/".join(["a" * 63] * 4)
    assert len(name) == 255
    digest, _ = api.push_image(name, "v1")
    assert api.tags(name) == ["v1"]
    assert name in api.catalog()
    assert api.manifest(name, "v1").header("Docker-Content-Digest") == digest


BAD_TAGS = {
    "too-long": "a" * 129,
    "leading-dot": ".hidden",
    "leading-dash": "-rc1",
    "plus": "v1+build",
    "space": "v1%20beta",
    "at-sign": "v1@x",
    "non-ascii": "v%C3%A9",
    "encoded-slash": "a%2Fb",
}


@pytest.mark.parametrize("case", sorted(BAD_TAGS))
def test_bad_tags_are_rejected(api: Registry, registry: RegistryProcess, case: str) -> None:
    tag = BAD_TAGS[case]
    config, layer = _config_and_layer(api, "tags/bad")
    manifest = image_manifest(config, [layer])
    with unchanged(api, registry.root, "tags/bad"):
        response = api.put_manifest("tags/bad", tag, manifest)
        assert response.status in (400, 404), response
        assert_error(response, response.status)
        if response.status == 400:
            assert_error(response, 400, {"MANIFEST_INVALID", "TAG_INVALID", "NAME_INVALID"})
        # A bad extra tag (?tag=) rejects the whole push: the good tag is not created either.
        response = api.request(
            "PUT",
            f"/v2/tags/bad/manifests/good?tag=also-good&tag={tag}",
            manifest,
            {"Content-Type": OCI_MANIFEST},
        )
        assert_error(response, 400, {"MANIFEST_INVALID", "TAG_INVALID"})
        lookup = api.manifest("tags/bad", tag)
        assert lookup.status in (400, 404), lookup
        assert_error(lookup, lookup.status)


def test_longest_valid_tag_is_accepted(api: Registry) -> None:
    tag = "_" + "a" * 127
    digest, _ = api.push_image("tags/long", tag)
    assert api.tags("tags/long") == [tag]
    assert api.manifest("tags/long", tag).header("Docker-Content-Digest") == digest


BAD_DIGESTS = {
    "unknown-algorithm": "md5:" + "a" * 32,
    "unknown-algorithm-right-length": "sha1024:" + "a" * 64,
    "short": "sha256:abc",
    "long": "sha256:" + "a" * 65,
    "uppercase-hex": "sha256:" + "A" * 64,
    "not-hex": "sha256:" + "g" * 64,
    "empty-hex": "sha256:",
    "sha512-wrong-length": "sha512:" + "a" * 64,
    "no-algorithm": ":" + "a" * 64,
}


def _digest_endpoints(digest: str, location: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v2/dig/repo/blobs/{digest}"),
        ("DELETE", f"/v2/dig/repo/blobs/{digest}"),
        ("GET", f"/v2/dig/repo/manifests/{digest}"),
        ("DELETE", f"/v2/dig/repo/manifests/{digest}"),
        ("PUT", f"/v2/dig/repo/manifests/{digest}"),
        ("GET", f"/v2/dig/repo/referrers/{digest}"),
        ("POST", f"/v2/dig/repo/blobs/uploads/?digest={digest}"),
        ("POST", f"/v2/dig/repo/blobs/uploads/?mount={digest}&from={SEED_REPO}"),
        ("PUT", with_query(location, digest=digest)),
    ]


@pytest.mark.parametrize("case", sorted(BAD_DIGESTS))
def test_bad_digests(api: Registry, registry: RegistryProcess, case: str) -> None:
    digest = BAD_DIGESTS[case]
    location = api.start_upload("dig/repo")
    assert api.patch(location, b"some data", 0).status == 202
    with unchanged(api, registry.root, "dig/repo"):
        for method, path in _digest_endpoints(digest, location):
            body = b"some data" if method in ("POST", "PUT") else None
            if "manifests" in path and method == "PUT":
                body = image_manifest(b"{}", [])
            response = api.request(method, path, body, {"Content-Type": OCI_MANIFEST})
            assert_error(response, 400, "DIGEST_INVALID")
        head = api.head(f"/v2/dig/repo/blobs/{digest}")
        assert head.status == 400, head
    assert _uploads(registry.root) == [location.rsplit("/", 1)[1]]
    assert api.get(location).header("Range") == "0-8"


# -- upload sessions ----------------------------------------------------------------------


def test_out_of_order_chunk_is_416(api: Registry, registry: RegistryProcess) -> None:
    data = bytes(range(40))
    location = api.start_upload("up/order")
    assert api.patch(location, data[:10], 0).header("Range") == "0-9"
    with unchanged(api, registry.root, "up/order"):
        for start in (20, 5, 0, 11):  # gap, overlap, restart, off by one
            response = api.patch(location, data[start : start + 10], start)
            assert_error(response, 416, "BLOB_UPLOAD_INVALID")
            assert response.header("Range") == "0-9", response
            assert (response.header("Location") or "").endswith(location.rsplit("/", 1)[1])
        # The final PUT with an out-of-order Content-Range is refused the same way.
        response = api.request(
            "PUT",
            with_query(location, digest=sha256(data)),
            data[20:],
            {"Content-Range": "20-39", "Content-Type": "application/octet-stream"},
        )
        assert_error(response, 416, "BLOB_UPLOAD_INVALID")
        assert response.header("Range") == "0-9"
        assert api.get(location).header("Range") == "0-9"
    assert api.patch(location, data[10:20], 10).header("Range") == "0-19"
    response = api.request(
        "PUT",
        with_query(location, digest=sha256(data)),
        data[20:],
        {"Content-Range": "20-39", "Content-Type": "application/octet-stream"},
    )
    assert response.status == 201, response
    assert api.blob("up/order", sha256(data)) == data


@pytest.mark.parametrize(
    "upload_id",
    [str(uuid.uuid4()), "not-a-uuid", "..", "%2e%2e", "A" * 300],
    ids=["random-uuid", "not-a-uuid", "dot-dot", "encoded-dot-dot", "long"],
)
def test_unknown_upload_id(api: Registry, registry: RegistryProcess, upload_id: str) -> None:
    location = f"/v2/up/unknown/blobs/uploads/{upload_id}"
    with unchanged(api, registry.root, "up/unknown"):
        for method, path, body in [
            ("GET", location, None),
            ("PATCH", location, b"data"),
            ("PUT", with_query(location, digest=sha256(b"data")), b"data"),
            ("PUT", with_query(location, digest=sha256(b"")), None),
            ("DELETE", location, None),
        ]:
            response = api.request(method, path, body, {"Content-Type": "application/octet-stream"})
            assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
    assert _uploads(registry.root) == []


def test_cancel_twice_is_safe(api: Registry, registry: RegistryProcess) -> None:
    data = b"to be cancelled"
    location = api.start_upload("up/cancel")
    assert api.patch(location, data, 0).status == 202
    with unchanged(api, registry.root, "up/cancel"):
        response = api.request("DELETE", location)
        assert response.status == 204, response
        assert_error(api.request("DELETE", location), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(api.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(api.patch(location, b"more"), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(api.finish(location, sha256(data)), 404, "BLOB_UPLOAD_UNKNOWN")
    assert _uploads(registry.root) == []
    assert not blob_file(registry.root, sha256(data)).exists()
    # A new session for the same content works.
    assert api.push_blob("up/cancel", data) == sha256(data)


def test_upload_id_from_another_repository(api: Registry, registry: RegistryProcess) -> None:
    data = b"belongs to repo a"
    location = api.start_upload("up/a")
    assert api.patch(location, data[:5], 0).status == 202
    upload_id = location.rsplit("/", 1)[1]
    foreign = f"/v2/up/b/blobs/uploads/{upload_id}"
    with unchanged(api, registry.root, "up/a", "up/b"):
        for method, path, body in [
            ("GET", foreign, None),
            ("PATCH", foreign, data[5:]),
            ("PUT", with_query(foreign, digest=sha256(data)), data[5:]),
            ("PUT", with_query(foreign, digest=sha256(data[:5])), None),
            ("DELETE", foreign, None),
        ]:
            response = api.request(method, path, body, {"Content-Type": "application/octet-stream"})
            assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
        assert api.get(location).header("Range") == "0-4"
    # Untouched in its own repository, where it completes; repository b never sees the blob.
    assert api.patch(location, data[5:], 5).status == 202
    assert api.finish(location, sha256(data)).status == 201
    assert api.blob("up/a", sha256(data)) == data
    assert not api.blob_exists("up/b", sha256(data))


# -- Range requests on blobs ----------------------------------------------------------------


def test_range_requests(api: Registry, registry: RegistryProcess) -> None:
    data = bytes(range(256)) * 4  # 1024 bytes
    digest = api.push_blob("range/repo", data)
    path = f"/v2/range/repo/blobs/{digest}"

    def ranged(value: str, method: str = "GET") -> Any:
        return api.request(method, path, headers={"Range": value})

    cases = {
        "bytes=0-9": (0, 10),
        "bytes=1000-": (1000, 1024),
        "bytes=-24": (1000, 1024),
        "bytes=1020-5000": (1020, 1024),
        "bytes=1023-1023": (1023, 1024),
        "bytes=-5000": (0, 1024),
    }
    for value, (start, end) in cases.items():
        response = ranged(value)
        assert response.status == 206, (value, response)
        assert response.body == data[start:end], value
        assert response.header("Content-Range") == f"bytes {start}-{end - 1}/1024", value
        assert response.header("Content-Length") == str(end - start), value
        head = ranged(value, "HEAD")
        assert head.status == 206, (value, head)
        assert head.header("Content-Length") == str(end - start), value
        assert head.header("Docker-Content-Digest") == digest

    for value in ("bytes=1024-", "bytes=5000-6000", "bytes=-0", "bytes=10-5"):
        response = ranged(value)
        assert_error(response, 416)
        assert response.header("Content-Range") == "bytes */1024", (value, response)

    # Without Range: the whole blob, advertising range support.
    response = api.get(path)
    assert response.status == 200
    assert response.body == data
    assert response.header("Accept-Ranges") == "bytes"
