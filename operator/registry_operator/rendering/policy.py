"""The server's policy as Secrets: a main file listing shards, and the shards. Pure.

One Secret holds at most 1 MiB, and a registry's policy grows with its Repositories and
granted namespaces (about 8,000 Repositories granting two namespaces each filled it).
So the policy is split (docs/auth.md, "Split policies"):

- shards, `<registry>-policy-<i>`, each one gzipped JSON file `policy-<i>.json.gz` with
  the robots' grants and the rules whose keys hash to it. A grant is placed by its path
  and robot (not by its robot alone, so one namespace granted 100,000 paths still spreads
  out), a rule by its path; a new Repository therefore changes one or two shards, not all;
- the main file, `<registry>-policy` (`policy.yaml`), with the admins, the peer
  accounts and the list of shards with the SHA-256 of each. It is written last; the
  server applies a set only when every shard matches the digest the main file lists,
  so a reload never sees half a policy, whatever order the kubelet updates them in.

The shard count doubles when a shard would exceed SHARD_BYTES (compressed) and halves
when all are far below it. Every pod mounts SHARD_SLOTS shard Secrets (optional ones, so
absent shards are fine); a policy needing more renders more slots, which rolls the pods
once (`slots`).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from registry_operator import access, models
from registry_operator.rendering import manifests, names

_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# A Secret's data may hold 1 MiB: a shard stays well below, the main file is small.
SHARD_BYTES = 384 * 1024
SHARD_SLOTS = names.POLICY_SHARD_SLOTS


@dataclasses.dataclass(frozen=True)
class Rendered:
    shards: tuple[bytes, ...]  # gzipped JSON, shard i at index i
    main: str  # policy.yaml

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(shard) for shard in self.shards)


def _shard_of(key: str, count: int) -> int:
    # crc32: stable across processes and versions (hash() is salted), and cheap.
    return zlib.crc32(key.encode()) % count


def _robot_key(credential: str) -> str:
    """`pull.team-a` of `pull.team-a.3`: a robot's credentials stay together."""
    return credential.rsplit(".", 1)[0]


def _rule(rule: access.Rule) -> dict[str, Any]:
    document: dict[str, Any] = {
        "repository": rule.repository,
        "anonymous_pull": rule.anonymous_pull,
    }
    if rule.immutable_tags:
        document["immutable_tags"] = list(rule.immutable_tags)
    if rule.keep_last is not None or rule.untagged_days is not None:
        retention: dict[str, Any] = {}
        if rule.keep_last is not None:
            retention.update(keep_last=rule.keep_last, protect=list(rule.protect))
        if rule.untagged_days is not None:
            retention["untagged_days"] = rule.untagged_days
        document["retention"] = retention
    if rule.quota_storage is not None or rule.quota_tags is not None:
        document["quota"] = {
            key: value
            for key, value in (("storage", rule.quota_storage), ("tags", rule.quota_tags))
            if value is not None
        }
    return document


def shard_documents(policy: access.Policy, count: int) -> list[dict[str, Any]]:
    """The robots and rules of each of `count` shards (pure data, sorted)."""
    robots: list[dict[str, tuple[str, list[dict[str, Any]]]]] = [{} for _ in range(count)]
    for name, secret_hash, grants in policy.robots:
        key = _robot_key(name)
        for path, actions in grants:
            shard = robots[_shard_of(f"{path}\0{key}", count)]
            entry = shard.setdefault(name, (secret_hash, []))
            entry[1].append({"repository": path, "actions": list(actions)})
    rules: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    for rule in policy.rules:
        rules[_shard_of(rule.repository, count)].append(_rule(rule))
    documents = []
    for i in range(count):
        document: dict[str, Any] = {"version": 1}
        if robots[i]:
            document["robots"] = [
                {"name": name, "secret_hash": secret_hash, "access": grants}
                for name, (secret_hash, grants) in sorted(robots[i].items())
            ]
        if rules[i]:
            document["rules"] = rules[i]
        documents.append(document)
    return documents


def _pack(document: Mapping[str, Any]) -> bytes:
    text = json.dumps(document, separators=(",", ":"), sort_keys=True)
    # mtime=0: the same policy gives the same bytes, so an unchanged shard is not written.
    return gzip.compress(text.encode(), compresslevel=6, mtime=0)


def shards(policy: access.Policy, count: int) -> tuple[bytes, ...]:
    return tuple(_pack(document) for document in shard_documents(policy, count))


def choose(policy: access.Policy, previous: int = 1, limit: int | None = None) -> tuple[bytes, ...]:
    """The shards, starting from the previous count: doubled while one is larger than
    `limit` (SHARD_BYTES), halved while all would stay far below it (the margin keeps it
    from flapping)."""
    limit = limit or SHARD_BYTES
    count = max(1, previous)
    packed = shards(policy, count)
    while max(len(s) for s in packed) > limit:
        count *= 2
        packed = shards(policy, count)
    while count > 1 and sum(len(s) for s in packed) < limit * count // 8:
        smaller = shards(policy, count // 2)
        if max(len(s) for s in smaller) > limit // 2:
            break
        count, packed = count // 2, smaller
    return packed


def main_text(owner: models.Owner, policy: access.Policy, packed: Sequence[bytes]) -> str:
    return manifests.text(
        "policy.yaml.j2",
        name=owner.name,
        namespace=owner.namespace,
        policy=policy,
        shards=[
            {"file": names.policy_shard_file(i), "sha256": hashlib.sha256(data).hexdigest()}
            for i, data in enumerate(packed)
        ],
    )


def render(
    owner: models.Owner, policy: access.Policy, previous: int = 1, limit: int | None = None
) -> Rendered:
    packed = choose(policy, previous, limit)
    return Rendered(shards=packed, main=main_text(owner, policy, packed))


def slots(count: int) -> int:
    """Shard Secrets the pods mount for a policy of `count` shards."""
    found = SHARD_SLOTS
    while found < count:
        found *= 2
    return found


def shard_secret(owner: models.Owner, index: int, data: bytes) -> manifests.Manifest:
    return manifests.manifest(
        "secret.yaml.j2",
        name=names.policy_shard_secret(owner.name, index),
        namespace=owner.namespace,
        labels=names.labels(owner.name, names.POLICY_COMPONENT),
        owner_references=manifests.owner_references(owner),
        data={names.policy_shard_file(index): base64.b64encode(data).decode("ascii")},
    )


def main_secret(owner: models.Owner, rendered: Rendered) -> manifests.Manifest:
    secret = manifests.manifest(
        "secret.yaml.j2",
        name=names.policy_secret(owner.name),
        namespace=owner.namespace,
        labels=names.labels(owner.name, names.POLICY_COMPONENT),
        owner_references=manifests.owner_references(owner),
        data={names.POLICY_FILE: base64.b64encode(rendered.main.encode()).decode("ascii")},
    )
    # Read by the Registry's reconcile: how many shard Secrets the pods must mount.
    secret["metadata"]["annotations"] = {names.POLICY_SHARDS_ANNOTATION: str(len(rendered.shards))}
    return secret


def secrets(owner: models.Owner, rendered: Rendered) -> list[manifests.Manifest]:
    """The shard Secrets, then the main one: the order they must be written in."""
    found = [shard_secret(owner, i, data) for i, data in enumerate(rendered.shards)]
    return [*found, main_secret(owner, rendered)]


def shard_count(main: Mapping[str, Any] | None) -> int:
    """The shard count a stored main Secret announces (1 when unknown)."""
    annotations = ((main or {}).get("metadata") or {}).get("annotations") or {}
    try:
        return max(1, int(annotations.get(names.POLICY_SHARDS_ANNOTATION, "1")))
    except ValueError:
        return 1


def read_stored(found: Mapping[str, Mapping[str, Any]], registry: str) -> access.Stored:
    """What the stored policy Secrets (by name) grant: the inverse of `secrets`, for
    telling which grants are in force when a new policy could not be written. Shards
    that do not match the main file's digests count as absent; an older single-file
    policy (robots and rules in the main file) is read too."""
    main = found.get(names.policy_secret(registry))
    text = _data(main).get(names.POLICY_FILE)
    try:
        document = yaml.load(text, Loader=_LOADER) if text is not None else None
    except yaml.YAMLError:
        document = None
    if not isinstance(document, dict):
        return access.Stored()
    parts: list[Mapping[str, Any]] = [document]
    by_file = {
        names.policy_shard_file(i): names.policy_shard_secret(registry, i)
        for i in range(len(document.get("shards") or []))
    }
    for ref in document.get("shards") or []:
        if not isinstance(ref, dict):
            continue
        name = str(ref.get("file"))
        raw = _raw(found.get(by_file.get(name, "")), name)
        if raw is None or hashlib.sha256(raw).hexdigest() != ref.get("sha256"):
            continue
        try:
            shard = json.loads(gzip.decompress(raw))
        except (OSError, EOFError, ValueError):
            continue
        if isinstance(shard, dict):
            parts.append(shard)
    return _stored(parts)


def _data(secret: Mapping[str, Any] | None) -> dict[str, str]:
    found = {}
    for key, value in ((secret or {}).get("data") or {}).items():
        try:
            found[key] = base64.b64decode(value).decode()
        except (ValueError, UnicodeDecodeError):
            continue
    return found


def _raw(secret: Mapping[str, Any] | None, key: str) -> bytes | None:
    value = ((secret or {}).get("data") or {}).get(key)
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value)
    except ValueError:
        return None


def _stored(parts: Sequence[Mapping[str, Any]]) -> access.Stored:
    accounts: dict[str, str] = {}
    grants: set[tuple[str, str]] = set()
    rules: set[access.Rule] = set()
    for part in parts:
        for robot in part.get("robots") or []:
            name, secret_hash = robot.get("name"), robot.get("secret_hash")
            if not isinstance(name, str) or not isinstance(secret_hash, str):
                continue
            accounts[name] = secret_hash
            for grant in robot.get("access") or []:
                grants.add((name, str(grant.get("repository"))))
        for rule in part.get("rules") or []:
            retention = rule.get("retention") or {}
            quota = rule.get("quota") or {}
            rules.add(
                access.Rule(
                    str(rule.get("repository")),
                    anonymous_pull=bool(rule.get("anonymous_pull")),
                    immutable_tags=tuple(rule.get("immutable_tags") or ()),
                    keep_last=retention.get("keep_last"),
                    protect=tuple(retention.get("protect") or ()),
                    untagged_days=retention.get("untagged_days"),
                    quota_storage=quota.get("storage"),
                    quota_tags=quota.get("tags"),
                )
            )
    return access.Stored(accounts=accounts, grants=frozenset(grants), rules=frozenset(rules))
