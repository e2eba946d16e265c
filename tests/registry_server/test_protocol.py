"""Table-driven tests of the pure OCI rules."""

from __future__ import annotations

import json

import pytest

from registry_server.protocol import digests, errors, manifests, names, pagination, ranges

SHA = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "value",
    [SHA, "sha512:" + "b" * 128],
)
def test_valid_digests(value: str) -> None:
    assert str(digests.parse(value)) == value


@pytest.mark.parametrize(
    "value",
    [
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "md5:" + "a" * 32,
        "sha256" + "a" * 64,
        "sha256:",
        ":" + "a" * 64,
        "sha256:" + "g" * 64,
        "sha512:" + "b" * 64,
    ],
)
def test_invalid_digests(value: str) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        digests.parse(value)
    assert exc.value.error is errors.DIGEST_INVALID


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "library/ubuntu",
        "a/b/c",
        "my-repo",
        "my__repo",
        "a.b",
        "a---b",
        "x" * 255,
        "team-a/api",
        "0/1",
    ],
)
def test_valid_names(name: str) -> None:
    assert names.validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../b",
        "A",
        "Upper/case",
        "a//b",
        "/a",
        "a/",
        "-a",
        "a-",
        "a_",
        ".a",
        "a...b",
        "a/./b",
        "x" * 256,
        "",
        "a b",
        "a%2fb",
        "a___b",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        names.validate_name(name)
    assert exc.value.error is errors.NAME_INVALID
    assert exc.value.status == 400


@pytest.mark.parametrize("tag", ["latest", "v1.0", "_x", "A" * 128, "1", "v1-rc.2_b"])
def test_valid_tags(tag: str) -> None:
    assert names.validate_tag(tag) == tag


@pytest.mark.parametrize("tag", [".x", "-x", "A" * 129, "", "a/b", "a:b", "ä", "v1\n"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(errors.RegistryError):
        names.validate_tag(tag)


def test_reference_is_tag_or_digest() -> None:
    assert names.parse_reference("v1") == "v1"
    assert isinstance(names.parse_reference(SHA), digests.Digest)
    with pytest.raises(errors.RegistryError):
        names.parse_reference("sha256:short")


def _desc(media_type: str = "application/octet-stream", size: int = 1) -> dict[str, object]:
    return {"mediaType": media_type, "digest": SHA, "size": size}


def test_parse_image_manifest() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_MANIFEST,
            "config": _desc("application/vnd.oci.image.config.v1+json"),
            "layers": [_desc(), _desc()],
            "subject": _desc(manifests.OCI_MANIFEST),
            "annotations": {"a": "b"},
        }
    ).encode()
    parsed = manifests.parse(body, None)
    assert parsed.media_type == manifests.OCI_MANIFEST
    assert len(parsed.blobs) == 3 and not parsed.children
    assert parsed.subject is not None and str(parsed.subject.digest) == SHA
    assert parsed.artifact_type == "application/vnd.oci.image.config.v1+json"
    assert parsed.annotations == {"a": "b"}


def test_artifact_type_wins_over_config_media_type() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig",
            "config": _desc(manifests.OCI_EMPTY_CONFIG),
            "layers": [],
        }
    ).encode()
    assert manifests.parse(body, None).artifact_type == "application/vnd.example.sig"


def test_parse_index_and_docker_list() -> None:
    for media_type in (manifests.OCI_INDEX, manifests.DOCKER_LIST):
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "manifests": [_desc(manifests.OCI_MANIFEST)],
            }
        ).encode()
        parsed = manifests.parse(body, media_type)
        assert parsed.is_index and len(parsed.children) == 1


def test_media_type_from_content_type_header() -> None:
    body = json.dumps({"schemaVersion": 2, "config": _desc(), "layers": []}).encode()
    assert manifests.parse(body, manifests.DOCKER_MANIFEST).media_type == manifests.DOCKER_MANIFEST


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        json.dumps({"schemaVersion": 1, "config": _desc(), "layers": []}).encode(),
        json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode(),
        json.dumps({"schemaVersion": 2, "mediaType": manifests.OCI_MANIFEST}).encode(),
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": manifests.OCI_MANIFEST,
                "config": {"mediaType": "x", "digest": "sha256:zz", "size": 1},
            }
        ).encode(),
        json.dumps(
            {"schemaVersion": 2, "mediaType": manifests.OCI_MANIFEST, "config": _desc(size=-1)}
        ).encode(),
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": manifests.OCI_MANIFEST,
                "config": _desc(),
                "layers": {},
            }
        ).encode(),
        json.dumps({"schemaVersion": 2, "mediaType": manifests.OCI_INDEX}).encode(),
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": manifests.OCI_MANIFEST,
                "config": _desc(),
                "annotations": {"a": 1},
            }
        ).encode(),
    ],
)
def test_invalid_manifests(doc: bytes) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        manifests.parse(doc, None)
    assert exc.value.error is errors.MANIFEST_INVALID


_IMAGE = {"schemaVersion": 2, "mediaType": manifests.OCI_MANIFEST, "config": _desc(), "layers": []}
OTHER = "sha256:" + "e" * 64


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # Read as an index here, as an image by others (GHSA-77vh-xpmg-72qh).
        (
            {"schemaVersion": 2, "manifests": [], "config": _desc(), "layers": [_desc()]},
            "an index has no config or layers",
        ),
        (
            {"schemaVersion": 2, "mediaType": manifests.OCI_INDEX, "manifests": [], "layers": []},
            "an index has no config or layers",
        ),
        # Go clients match keys whatever their case: "Layers" would be the layers to them.
        ({**_IMAGE, "Layers": [{**_desc(), "digest": OTHER}]}, "'Layers' is 'layers'"),
        ({**_IMAGE, "config": {**_desc(), "DIGEST": OTHER}}, "config: key 'DIGEST'"),
        ({**_IMAGE, "layers": [{**_desc(), "Size": 9}]}, "layers[0]: key 'Size'"),
    ],
)
def test_manifests_other_readers_would_read_differently(
    body: dict[str, object], reason: str
) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        manifests.parse(
            json.dumps(body).encode(), manifests.OCI_INDEX if "manifests" in body else None
        )
    assert exc.value.error is errors.MANIFEST_INVALID
    assert reason in str(exc.value.detail), exc.value.detail


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (json.dumps(_IMAGE).encode("utf-16"), "not UTF-8"),
        (b"\xef\xbb\xbf" + json.dumps(_IMAGE).encode(), "not valid JSON"),  # a BOM
        (json.dumps({**_IMAGE, "annotations": {"n": float("nan")}}).encode(), "NaN is not JSON"),
        (
            json.dumps({**_IMAGE, "config": {**_desc(), "size": float("inf")}}).encode(),
            "Infinity is not JSON",
        ),
        (json.dumps({**_IMAGE, "annotations": {"a": "\ud800"}}).encode(), "not valid Unicode"),
    ],
)
def test_manifest_json_is_strict(body: bytes, reason: str) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        manifests.parse(body, None)
    assert exc.value.error is errors.MANIFEST_INVALID
    assert reason in str(exc.value.detail), exc.value.detail


def test_what_strictness_leaves_alone() -> None:
    """Annotation keys of any case, a surrogate pair escaped (a valid character)."""
    body = {**_IMAGE, "annotations": {"Layers": "x", "layers": "y", "emoji": "\U0001f600"}}
    parsed = manifests.parse(json.dumps(body).encode(), None)  # ensure_ascii: a pair
    assert parsed.annotations == {"Layers": "x", "layers": "y", "emoji": "\U0001f600"}


def test_media_type_mismatch_with_header() -> None:
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": manifests.OCI_MANIFEST, "config": _desc(), "layers": []}
    ).encode()
    with pytest.raises(errors.RegistryError):
        manifests.parse(body, manifests.DOCKER_MANIFEST)


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        ([], True),
        (["*/*"], True),
        ([manifests.OCI_MANIFEST], True),
        ([manifests.DOCKER_MANIFEST], False),
        ([f"{manifests.OCI_MANIFEST};q=0.5"], True),
    ],
)
def test_negotiate(accept: list[str], ok: bool) -> None:
    assert manifests.negotiate(manifests.OCI_MANIFEST, accept) is ok


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=90-", 100, (90, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=50-500", 100, (50, 100)),
        ("bytes=100-", 100, None),
        ("bytes=5-2", 100, None),
        ("bytes=-", 100, None),
        ("items=0-1", 100, None),
    ],
)
def test_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert ranges.parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "expected"), [("0-99", (0, 99)), ("bytes 10-19/100", (10, 19)), ("5-5", (5, 5))]
)
def test_content_range(header: str, expected: tuple[int, int]) -> None:
    assert ranges.parse_content_range(header) == expected


@pytest.mark.parametrize("header", ["", "a-b", "10-5", "-5"])
def test_bad_content_range(header: str) -> None:
    with pytest.raises(errors.RegistryError) as exc:
        ranges.parse_content_range(header)
    assert exc.value.status == 416


def test_pagination() -> None:
    assert pagination.parse_n(None) is None
    assert pagination.parse_n("5") == 5
    assert pagination.parse_n("999999999") == pagination.MAX_PAGE
    assert pagination.parse_n("0000000000") == 0  # the spec's empty page, not 10,000
    assert pagination.parse_n("00005") == 5
    assert pagination.parse_last("") is None and pagination.parse_last("a/b") == "a/b"
    assert len(pagination.parse_last("x" * 100_000) or "") == 4096
    with pytest.raises(errors.RegistryError):
        pagination.parse_last("a\x00")
    for bad in ("-1", "x"):
        with pytest.raises(errors.RegistryError):
            pagination.parse_n(bad)
    link = pagination.link_header("/v2/a/tags/list", 2, "b")
    assert link == '</v2/a/tags/list?n=2&last=b>; rel="next"'


def test_error_body_shape() -> None:
    err = errors.RegistryError(errors.BLOB_UNKNOWN, detail={"digest": SHA})
    assert err.body() == {
        "errors": [
            {
                "code": "BLOB_UNKNOWN",
                "message": "blob unknown to registry",
                "detail": {"digest": SHA},
            }
        ]
    }
    assert err.status == 404


def test_required_blobs_skip_external_layers_and_repeats() -> None:
    other = "sha256:" + "b" * 64
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_MANIFEST,
            "config": _desc("application/vnd.oci.image.config.v1+json"),
            "layers": [
                _desc(),
                {
                    "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar",
                    "digest": other,
                    "size": 1,
                },
                {
                    "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                    "digest": other,
                    "size": 1,
                },
            ],
        }
    ).encode()
    assert manifests.parse(body, None).required_blobs() == [SHA]


def test_a_trailing_newline_is_no_part_of_any_name() -> None:
    """``$`` also matches before a final newline: ``team-a/api\n`` passed as a name and
    reached the policy's patterns through ``?name=`` and ``from=`` (found by review)."""
    assert not names.is_valid_name("team-a/api\n")
    with pytest.raises(errors.RegistryError):
        names.validate_name("team-a/api\n")
    with pytest.raises(errors.RegistryError):
        digests.parse(SHA + "\n")
