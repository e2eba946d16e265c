"""Which of the user's objects a Registry on S3/PostgreSQL mounts, and what is missing."""

from __future__ import annotations

from collections.abc import Mapping

from registry_operator import backends, models

SPEC = models.parse_spec(
    {
        "replicas": 2,
        "storage": {
            "s3": {
                "bucket": "images",
                "credentialsSecretRef": {"name": "keys"},
                "caConfigMapRef": {"name": "ca", "key": "bundle.pem"},
            }
        },
        "metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}}},
    },
    image="img",
)
GOOD = {
    ("Secret", "keys"): {"accessKeyID": "AK", "secretAccessKey": "SK", "other": "x"},
    ("ConfigMap", "ca"): {"bundle.pem": "-----BEGIN CERTIFICATE-----"},
    ("Secret", "db"): {"dsn": "postgresql://db/berth"},
}


def _reader(objects: Mapping[tuple[str, str], Mapping[str, str]]) -> backends.Reader:
    return lambda kind, name: objects.get((kind, name))


def test_a_registry_on_a_volume_mounts_nothing_of_the_users() -> None:
    spec = models.parse_spec({}, image="img")
    assert not backends.external(spec)
    assert backends.check(spec, _reader({})) == backends.Check()


def test_everything_there() -> None:
    found = backends.check(SPEC, _reader(GOOD))
    assert found.problems == () and found.digest.startswith("sha256:")
    assert backends.external(SPEC)


def test_missing_objects_and_keys_are_named() -> None:
    objects = dict(GOOD)
    del objects[("Secret", "db")]
    objects[("Secret", "keys")] = {"accessKeyID": "AK"}
    found = backends.check(SPEC, _reader(objects))
    assert found.problems == (
        "Secret keys (spec.storage.s3.credentialsSecretRef) has no secretAccessKey",
        "Secret db (spec.metadata.postgresql.connectionSecretRef) does not exist",
    )


def test_the_digest_follows_the_keys_the_pods_read_only() -> None:
    base = backends.check(SPEC, _reader(GOOD)).digest
    rotated = {**GOOD, ("Secret", "keys"): {**GOOD[("Secret", "keys")], "secretAccessKey": "S2"}}
    assert backends.check(SPEC, _reader(rotated)).digest != base
    unrelated = {**GOOD, ("Secret", "keys"): {**GOOD[("Secret", "keys")], "other": "y"}}
    assert backends.check(SPEC, _reader(unrelated)).digest == base


def test_an_upstreams_ca_bundle_is_checked_and_rolls_the_pods_when_it_changes() -> None:
    """Read once at start: a rotated corporate CA must reach the pods, and a missing one
    (the pods cannot start) must be named (found by review)."""
    spec = models.parse_spec(
        {
            "upstreams": [
                {
                    "name": "corp",
                    "url": "https://registry.corp.example",
                    "prefix": "corp.example",
                    "caConfigMapRef": {"name": "corp-ca"},
                }
            ]
        },
        image="img",
    )
    assert not backends.external(spec)  # nothing the server must reach to be ready
    bundle = {("ConfigMap", "corp-ca"): {"ca.crt": "-----BEGIN CERTIFICATE----- one"}}
    found = backends.check(spec, _reader(bundle))
    assert found.problems == () and found.digest.startswith("sha256:")
    renewed = {("ConfigMap", "corp-ca"): {"ca.crt": "-----BEGIN CERTIFICATE----- two"}}
    assert backends.check(spec, _reader(renewed)).digest != found.digest
    assert backends.check(spec, _reader({})).problems == (
        "ConfigMap corp-ca (spec.upstreams[0].caConfigMapRef) does not exist",
    )
