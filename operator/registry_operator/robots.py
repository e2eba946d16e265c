"""Robot accounts of one registry and their rotation, as a pure state machine.

A robot is what a granted namespace pulls (or pushes) with: one per namespace, mode and
registry, named `<mode>.<namespace>.<generation>`, so revoking one namespace never
touches another's credential. Rotation never leaves a window in which a pull with a
credential that was handed out fails:

1. *staged*: a new credential is added to the registry's policy next to the current one;
   the Secrets still hold the current one.
2. *promoted*, once the server accepts the new credential (or, when the operator cannot
   reach the server, once the propagation time has passed): the Secrets get the new
   credential; the old one stays in the policy for the overlap period, so pulls that
   started with it finish.
3. the old credential is dropped from the policy.

Each robot is stored as JSON under its key in the registry's `<name>-robots` Secret (the
operator's own record; the plain secret also lives in the distributed Secrets). Peer
accounts (`peer.<namespace>.<registry>`, see replication) live there too, never rotated.
No I/O here; new credentials come from `credentials.Generators`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import bcrypt

from registry_operator import credentials

PULL = "pull"
PUSH = "push"
MODES = (PULL, PUSH)
ACTIONS: Mapping[str, tuple[str, ...]] = {PULL: ("pull",), PUSH: ("pull", "push")}
PEER_PREFIX = "peer."

# Robot secrets are 192 random bits: no brute force gets near them at any bcrypt cost.
# Every granted namespace has its own robot (hundreds per registry), and the server
# checks each one when it is first used, so the cost is the cheapest bcrypt allows but one.
BCRYPT_ROUNDS = 5


def hash_secret(secret: str) -> str:
    return bcrypt.hashpw(secret.encode("utf-8"), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()


def robot_key(mode: str, namespace: str) -> str:
    return f"{mode}.{namespace}"


def peer_key(namespace: str, registry: str) -> str:
    """The account a same-cluster peer registry pushes into this one with."""
    return f"{PEER_PREFIX}{namespace}.{registry}"


def peer_of(key: str) -> tuple[str, str]:
    """(namespace, registry) of a peer account key (neither part can contain a dot)."""
    namespace, _, registry = key.removeprefix(PEER_PREFIX).partition(".")
    return namespace, registry


@dataclasses.dataclass(frozen=True)
class Credential:
    name: str
    hash: str
    created: float
    password: str = ""  # empty for an old credential kept only for its overlap


@dataclasses.dataclass(frozen=True)
class Robot:
    key: str
    generation: int
    current: Credential
    staged: Credential | None = None  # in the policy, not yet handed out
    staged_at: float | None = None
    previous: Credential | None = None  # handed out before; valid until `previous_until`
    previous_until: float | None = None
    rotated_at: float | None = None  # when `current` was handed out in place of another

    @property
    def accounts(self) -> tuple[Credential, ...]:
        """Every credential the server must accept now."""
        return tuple(c for c in (self.current, self.staged, self.previous) if c is not None)

    @property
    def rotating(self) -> bool:
        return self.staged is not None or self.previous is not None


def _credential(
    key: str, generation: int, now: float, generators: credentials.Generators
) -> Credential:
    password = generators.password()
    return Credential(
        name=f"{key}.{generation}", hash=generators.hash(password), created=now, password=password
    )


def new(key: str, now: float, generators: credentials.Generators) -> Robot:
    return Robot(key=key, generation=1, current=_credential(key, 1, now, generators))


def stage(robot: Robot, now: float, generators: credentials.Generators) -> Robot:
    """Start a rotation (a no-op while one is staged already)."""
    if robot.staged is not None:
        return robot
    generation = robot.generation + 1
    return dataclasses.replace(
        robot,
        generation=generation,
        staged=_credential(robot.key, generation, now, generators),
        staged_at=now,
    )


def promote(robot: Robot, now: float, overlap: float) -> Robot:
    """Hand out the staged credential; the current one stays valid for `overlap`."""
    if robot.staged is None:
        return robot
    old = dataclasses.replace(robot.current, password="")
    return dataclasses.replace(
        robot,
        current=robot.staged,
        staged=None,
        staged_at=None,
        previous=old,
        previous_until=now + overlap,
        rotated_at=now,
    )


def expire(robot: Robot, now: float) -> Robot:
    """Drop the old credential once its overlap has passed."""
    if robot.previous is None or robot.previous_until is None or now < robot.previous_until:
        return robot
    return dataclasses.replace(robot, previous=None, previous_until=None)


# --- storage in the robots Secret ---------------------------------------------------------


def _credential_json(credential: Credential | None) -> dict[str, Any] | None:
    if credential is None:
        return None
    found: dict[str, Any] = {
        "name": credential.name,
        "hash": credential.hash,
        "created": credential.created,
    }
    if credential.password:
        found["password"] = credential.password
    return found


def dump(robot: Robot) -> str:
    document = {
        "generation": robot.generation,
        "current": _credential_json(robot.current),
        "staged": _credential_json(robot.staged),
        "stagedAt": robot.staged_at,
        "previous": _credential_json(robot.previous),
        "previousUntil": robot.previous_until,
        "rotatedAt": robot.rotated_at,
    }
    return json.dumps({k: v for k, v in document.items() if v is not None}, sort_keys=True)


def _load_credential(raw: Any) -> Credential | None:
    if not isinstance(raw, Mapping):
        return None
    name, hashed, created = raw.get("name"), raw.get("hash"), raw.get("created")
    if not isinstance(name, str) or not isinstance(hashed, str):
        return None
    if not isinstance(created, int | float):
        return None
    password = raw.get("password", "")
    return Credential(name, hashed, float(created), password if isinstance(password, str) else "")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def load(key: str, text: str) -> Robot | None:
    """A stored robot; None when the entry is unusable (a new robot replaces it)."""
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    if not isinstance(raw, Mapping):
        return None
    current = _load_credential(raw.get("current"))
    generation = raw.get("generation")
    if current is None or not current.password or not isinstance(generation, int):
        return None
    staged = _load_credential(raw.get("staged"))
    if staged is not None and not staged.password:
        staged = None
    previous = _load_credential(raw.get("previous"))
    return Robot(
        key=key,
        generation=generation,
        current=current,
        staged=staged,
        staged_at=_number(raw.get("stagedAt")) if staged else None,
        previous=previous,
        previous_until=_number(raw.get("previousUntil")) if previous else None,
        rotated_at=_number(raw.get("rotatedAt")),
    )


def load_all(data: Mapping[str, str]) -> dict[str, Robot]:
    found = {}
    for key, text in data.items():
        robot = load(key, text)
        if robot is not None:
            found[key] = robot
    return found
