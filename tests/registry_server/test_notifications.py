"""Notification envelopes (distribution's format) and the endpoint settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from registry_server.config import ConfigError, EndpointConfig, load
from registry_server.events.notifier import Source, cursor_name, event, read_headers, wanted
from registry_server.storage.index import Change, ManifestRecord

SOURCE = Source("host-1:5000", "eu", "https://registry.example.com")
DIGEST = "sha256:" + "a" * 64


def _change(op: str, tag: str | None, digest: str | None, actor: str | None = "ci") -> Change:
    return Change(7, "team-a/app", op, tag, digest, 1 << 20, "eu", 1_800_000_000.5, actor)


def test_push_event_carries_the_target_and_who() -> None:
    record = ManifestRecord(
        DIGEST, "application/vnd.oci.image.manifest.v1+json", 512, None, None, None, None
    )
    pushed = event(_change("tag", "v1", DIGEST), record, SOURCE)
    assert pushed == {
        "id": pushed["id"],
        "timestamp": "2027-01-15T08:00:00.500000Z",
        "action": "push",
        "target": {
            "repository": "team-a/app",
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "size": 512,
            "length": 512,
            "digest": DIGEST,
            "url": f"https://registry.example.com/v2/team-a/app/manifests/{DIGEST}",
            "tag": "v1",
        },
        "actor": {"name": "ci"},
        "source": {"addr": "host-1:5000", "instanceID": "eu"},
    }
    # Stable across redeliveries, distinct per change.
    assert event(_change("tag", "v1", DIGEST), record, SOURCE)["id"] == pushed["id"]
    other = Change(8, "team-a/app", "tag", "v1", DIGEST, 1, "eu", 0.0)
    assert event(other, record, SOURCE)["id"] != pushed["id"]
    # Another database (whose seq started again) names its changes differently.
    fresh = Source(SOURCE.addr, SOURCE.instance_id, SOURCE.base_url, log_id="another")
    assert event(_change("tag", "v1", DIGEST), record, fresh)["id"] != pushed["id"]


def test_delete_events() -> None:
    by_tag = event(_change("delete_tag", "v1", None, actor=None), None, SOURCE)
    assert by_tag["action"] == "delete"
    assert by_tag["target"] == {"repository": "team-a/app", "tag": "v1"}
    assert by_tag["actor"] == {}
    by_digest = event(_change("delete_manifest", None, DIGEST), None, SOURCE)
    assert by_digest["target"]["digest"] == DIGEST


def test_endpoint_filters() -> None:
    endpoint = EndpointConfig(
        "x", "http://x", ignore_actions=("delete",), ignore_media_types=("application/foo",)
    )
    push: dict[str, Any] = {"action": "push", "target": {"mediaType": "application/bar"}}
    assert wanted(endpoint, push)
    assert not wanted(endpoint, {"action": "delete", "target": {}})
    assert not wanted(endpoint, {"action": "push", "target": {"mediaType": "application/foo"}})
    assert cursor_name(endpoint) == "webhook:x"


def _load(tmp_path: Path, notifications: Any) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"notifications": notifications}))
    return load(path, env={})


def test_endpoint_settings(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        {
            "endpoints": [
                {
                    "name": "audit",
                    "url": "https://hooks.example.com/registry",
                    "headers": {"Authorization": "Bearer x"},
                    "ignore_actions": ["delete"],
                    "batch": 8,
                }
            ]
        },
    )
    (endpoint,) = config.notifications.endpoints
    assert endpoint.headers == (("Authorization", "Bearer x"),)
    assert endpoint.batch == 8 and endpoint.ignore_actions == ("delete",)


@pytest.mark.parametrize(
    ("notifications", "message"),
    [
        ({"endpoints": [{"name": "a"}]}, "url is required"),
        ({"endpoints": [{"name": "a", "url": "ftp://x"}]}, "must start with http"),
        (
            {"endpoints": [{"name": "a", "url": "http://x", "ignore_actions": ["pull"]}]},
            "ignore_actions",
        ),
        (
            {"endpoints": [{"name": "a", "url": "http://x", "headers": {"A": 1}}]},
            "mapping of strings",
        ),
        ({"endpoints": [{"name": "a", "url": "http://x", "batch": 0}]}, "batch"),
        ({"endpoints": [{"name": "a", "url": "http://x", "secret": 1}]}, "unknown keys"),
        (
            {"endpoints": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]},
            "unique",
        ),
        ({"hooks": []}, "expected a mapping with 'endpoints'"),
        (
            {"endpoints": [{"name": "a", "url": "http://x", "headers": {"X": "a\r\nEvil: 1"}}]},
            "invalid header",
        ),
        (
            {"endpoints": [{"name": "a", "url": "http://x", "headers": {"Bad Name": "v"}}]},
            "invalid header",
        ),
    ],
)
def test_invalid_endpoint_settings(tmp_path: Path, notifications: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, notifications)


def test_headers_from_a_mounted_secret(tmp_path: Path) -> None:
    mount = tmp_path / "hook"
    (mount / "..2026_11_27").mkdir(parents=True)  # the kubelet's own entries are skipped
    (mount / "Authorization").write_text("Bearer t0ken\n")
    assert read_headers(mount) == {"Authorization": "Bearer t0ken"}
    assert read_headers(None) == {}
    (mount / "X-Evil").write_text("a\r\nInjected: yes")
    with pytest.raises(ValueError, match="invalid header"):
        read_headers(mount)
