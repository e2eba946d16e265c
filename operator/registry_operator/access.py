"""Who may pull and push what in one registry: every Repository merged into one plan.

Pure: no I/O here. `plan()` takes what the API server and the registry server said
(the Registry, its Repositories, the namespaces, the stored robots, the answer of the
server about the newest staged credential) and decides the registry's policy, the robot
accounts (one per namespace and mode), the Secrets to write into granted namespaces, and
what to tell each Repository. `repository_status()` turns the plan plus what writing it
achieved into each Repository's `.status`. `granting` does the reading and the writing.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from registry_operator import credentials, models, patterns, robots, status, usage
from registry_operator.rendering import names
from registry_operator.status import Condition, rfc3339

READY = "Ready"
PATH_CONFLICT = "PathConflict"
ROTATING = "Rotating"
TAG_RULES = "TagRulesEnforced"
# On the Registry: whether the access the Repositories ask for is written for the server.
ACCESS_APPLIED = status.ACCESS_APPLIED

# How the server answered the probe with the newest staged credential.
ACCEPTED = "accepted"  # the server has the policy holding it: hand it out
REFUSED = "refused"  # not yet (the kubelet has not updated the mounted file): wait
UNREACHABLE = "unreachable"  # cannot ask: wait for the propagation time instead

SecretKey = tuple[str, str]  # (namespace, name) of a Secret in a granted namespace


@dataclasses.dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str]
    terminating: bool = False


@dataclasses.dataclass(frozen=True)
class Target:
    """The Registry the Repositories belong to, as far as access is concerned."""

    owner: models.Owner
    # The keys of `auths` in the dockerconfigjson: every address the pods' images may
    # name (the node proxy's localhost:<port>, the Ingress host, the Service).
    hosts: tuple[str, ...]
    admins: tuple[str, ...]  # accounts of the htpasswd file with every right
    peers: tuple[str, ...] = ()  # keys of same-cluster peers allowed to replicate in


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str  # the credential that was tried
    staged_at: float
    result: str  # ACCEPTED, REFUSED or UNREACHABLE


@dataclasses.dataclass(frozen=True)
class Settings:
    propagation: float = 120.0  # seconds until a mounted Secret surely reached the pods
    # The probe asks which hash the server holds (no login); an older server is probed
    # with a login, a failure there until it reloads: keep those few.
    probe_interval_max: float = 15.0


@dataclasses.dataclass(frozen=True)
class Desired:
    """One Secret to write into a granted namespace."""

    namespace: str
    name: str
    mode: str
    robot: str  # the robot's key
    service_accounts: tuple[str, ...]
    repositories: tuple[str, ...]  # names of the Repositories wanting it


@dataclasses.dataclass(frozen=True)
class Rule:
    repository: str
    anonymous_pull: bool = False
    immutable_tags: tuple[str, ...] = ()
    keep_last: int | None = None  # retention; None: keep every tag
    protect: tuple[str, ...] = ()
    untagged_days: int | None = None  # retention; None: keep untagged manifests
    quota_storage: int | None = None  # bytes
    quota_tags: int | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
    """The server's policy file (docs/auth.md), without formatting."""

    admins: tuple[str, ...]
    users: tuple[tuple[str, str], ...]  # (name, bcrypt hash)
    robots: tuple[tuple[str, str, tuple[tuple[str, tuple[str, ...]], ...]], ...]
    rules: tuple[Rule, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    robots: Mapping[str, robots.Robot]
    policy: Policy | None  # None: the registry is gone, nothing to write
    secrets: Mapping[tuple[str, str], Desired]
    active: Mapping[str, models.Repository]  # by Repository name: those holding their path
    conflicts: Mapping[str, str]  # Repository name -> the condition message
    secret_name_clashes: Mapping[str, tuple[str, ...]]  # Repository -> "namespace/name"
    rotations_handled: Mapping[str, str]  # Repository name -> the annotation it asked with
    requeue_after: float | None
    # Repository name -> the keys of `secrets` wanting it (sorted): its status reads
    # these, not every Secret of the registry.
    secrets_of: Mapping[str, tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)


def _secret_name(repository: models.Repository, mode: str, grant: models.Access) -> str:
    return grant.secret_name or names.access_secret(
        repository.registry, repository.owner.namespace, mode
    )


def _candidates(
    repository: models.Repository, by_name: Mapping[str, Namespace]
) -> Iterable[Namespace]:
    """The namespaces a Repository may grant: those it names (and its own, for push),
    or every one when it selects by label. Asking only these keeps a plan of thousands
    of Repositories from testing each against every namespace."""
    grants = [g for g in (repository.pull, repository.push) if g is not None]
    if any(g.selector is not None for g in grants):
        return by_name.values()
    named = {ns for g in grants for ns in g.namespaces}
    if repository.push is not None:
        named.add(repository.owner.namespace)
    return [by_name[ns] for ns in sorted(named) if ns in by_name]


def _grants(
    repository: models.Repository, namespace: Namespace
) -> Iterable[tuple[str, models.Access]]:
    if repository.pull is not None and repository.pull.covers(namespace.name, namespace.labels):
        yield robots.PULL, repository.pull
    push = repository.push
    if push is not None and (
        namespace.name == repository.owner.namespace
        or push.covers(namespace.name, namespace.labels)
    ):
        yield robots.PUSH, push


def holders(
    repositories: Sequence[models.Repository],
) -> tuple[dict[str, models.Repository], dict[str, str]]:
    """Which Repository holds what it claims: of claims naming a common repository (the
    same path, or patterns that overlap, `team-a/*` and `team-a/api`), the older one.
    Returns (active, conflicts)."""
    if not any(patterns.is_pattern(r.path) for r in repositories):
        return _holders_of_paths(repositories)
    active: dict[str, models.Repository] = {}
    newer: dict[str, list[models.Repository]] = collections.defaultdict(list)
    conflicts: dict[str, str] = {}
    exact: dict[str, models.Repository] = {}  # held exact paths
    # Held patterns and exact paths by their literal first component ("": a wildcard):
    # claims under different first components never overlap, so most are not compared.
    held_patterns: dict[str, list[models.Repository]] = collections.defaultdict(list)
    held_exact: dict[str, list[models.Repository]] = collections.defaultdict(list)
    for claim in sorted(repositories, key=lambda r: r.age_key):
        first = patterns.first_component(claim.path)
        found = [exact[claim.path]] if claim.path in exact else []
        groups = [held_patterns[first], held_patterns[""]] if first else held_patterns.values()
        found += [r for group in groups for r in group if patterns.overlap(r.path, claim.path)]
        if patterns.is_pattern(claim.path):
            near = [held_exact[first]] if first else held_exact.values()
            found += [r for group in near for r in group if patterns.matches(claim.path, r.path)]
        if found:
            holder = min(found, key=lambda r: r.age_key)
            newer[holder.owner.name].append(claim)
            conflicts[claim.owner.name] = (
                f"{_claim(claim, holder)} Repository {holder.owner.name}, which is older; "
                "this Repository grants nothing until one of them changes"
            )
            continue
        active[claim.owner.name] = claim
        if patterns.is_pattern(claim.path):
            held_patterns[first].append(claim)
        else:
            exact[claim.path] = claim
            held_exact[first].append(claim)
    for name, others in newer.items():
        holder = active[name]
        claimed = ", ".join(
            f"Repository {o.owner.name}" + ("" if o.path == holder.path else f" ({o.path})")
            for o in others
        )
        conflicts[name] = (
            f"path {holder.path} is also claimed by {claimed} (newer); this Repository keeps it"
        )
    return active, conflicts


def _holders_of_paths(
    repositories: Sequence[models.Repository],
) -> tuple[dict[str, models.Repository], dict[str, str]]:
    """`holders` when no claim is a pattern: claims conflict only on equal paths, which a
    dictionary finds (thousands of Repositories are planned on every pass)."""
    by_path: dict[str, list[models.Repository]] = collections.defaultdict(list)
    for repository in repositories:
        by_path[repository.path].append(repository)
    active: dict[str, models.Repository] = {}
    conflicts: dict[str, str] = {}
    for claims in by_path.values():
        winner = claims[0] if len(claims) == 1 else min(claims, key=lambda r: r.age_key)
        active[winner.owner.name] = winner
        if len(claims) == 1:
            continue
        others = sorted((c for c in claims if c is not winner), key=lambda r: r.age_key)
        claimed = ", ".join(o.owner.name for o in others)
        conflicts[winner.owner.name] = (
            f"path {winner.path} is also claimed by Repository {claimed} (newer); "
            "this Repository keeps it"
        )
        for other in others:
            conflicts[other.owner.name] = (
                f"{_claim(other, winner)} Repository {winner.owner.name}, which is older; "
                "this Repository grants nothing until one of them changes"
            )
    return active, conflicts


def _claim(claim: models.Repository, holder: models.Repository) -> str:
    if claim.path == holder.path:
        return f"path {claim.path} is held by"
    return f"path {claim.path} overlaps {holder.path}, held by"


def plan(
    target: Target | None,
    repositories: Sequence[models.Repository],
    namespaces: Sequence[Namespace],
    stored: Mapping[str, robots.Robot],
    now: float,
    generators: credentials.Generators,
    probe: Probe | None = None,
    settings: Settings = Settings(),
) -> Plan:
    active, conflicts = holders(repositories)
    if target is None:
        return Plan({}, None, {}, active, conflicts, {}, {}, None)

    # Who gets what: (mode, namespace) -> the Repositories granting it.
    granted: dict[tuple[str, str], list[models.Repository]] = collections.defaultdict(list)
    wanted: dict[tuple[str, str], list[tuple[str, models.Repository, models.Access]]] = (
        collections.defaultdict(list)
    )
    # Terminating namespaces: nothing can be written there any more.
    by_name = {n.name: n for n in namespaces if not n.terminating}
    for repository in active.values():
        for info in _candidates(repository, by_name):
            for mode, grant in _grants(repository, info):
                granted[(mode, info.name)].append(repository)
                wanted[(info.name, _secret_name(repository, mode, grant))].append(
                    (mode, repository, grant)
                )

    handled = {r.owner.name: r.rotate_request for r in active.values() if r.rotate_request}
    deadlines: list[float] = []
    state: dict[str, robots.Robot] = {}
    for (mode, namespace), granting in sorted(granted.items()):
        key = robots.robot_key(mode, namespace)
        robot = stored.get(key) or robots.new(key, now, generators)
        robot, deadline = _rotate(robot, granting, now, generators, probe, settings)
        state[key] = robot
        deadlines.extend(deadline)
    for key in target.peers:
        state[key] = stored.get(key) or robots.new(key, now, generators)

    secrets: dict[tuple[str, str], Desired] = {}
    clashes: dict[str, list[str]] = collections.defaultdict(list)
    secrets_of: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for (namespace, name), wants in sorted(wanted.items()):
        modes = sorted({mode for mode, _, _ in wants})
        mode = modes[0]  # a name wanted for pull and for push goes to pull; the push side is told
        for other_mode, repository, _ in wants:
            if other_mode != mode:
                clashes[repository.owner.name].append(f"{namespace}/{name}")
        chosen = [(r, g) for m, r, g in wants if m == mode]
        secrets[(namespace, name)] = Desired(
            namespace=namespace,
            name=name,
            mode=mode,
            robot=robots.robot_key(mode, namespace),
            service_accounts=tuple(sorted({sa for _, g in chosen for sa in g.service_accounts})),
            repositories=tuple(sorted({r.owner.name for r, _ in chosen})),
        )
        for repository_name in secrets[(namespace, name)].repositories:
            secrets_of[repository_name].append((namespace, name))

    policy = _policy(target, state, granted, active.values())
    return Plan(
        robots=state,
        policy=policy,
        secrets=secrets,
        active=active,
        conflicts=conflicts,
        secret_name_clashes={k: tuple(v) for k, v in clashes.items()},
        rotations_handled=handled,
        requeue_after=max(0.5, min(deadlines) - now) if deadlines else None,
        secrets_of={k: tuple(v) for k, v in secrets_of.items()},
    )


def _rotate(
    robot: robots.Robot,
    granting: Sequence[models.Repository],
    now: float,
    generators: credentials.Generators,
    probe: Probe | None,
    settings: Settings,
) -> tuple[robots.Robot, list[float]]:
    """Advance one robot's rotation; returns it and when to look at it again."""
    deadlines: list[float] = []
    overlap = max(r.rotation.overlap for r in granting)
    robot = robots.expire(robot, now)
    if robot.staged is not None and robot.staged_at is not None:
        accepted = (
            probe is not None and probe.result == ACCEPTED and robot.staged_at <= probe.staged_at
        )
        # When the server cannot be asked, the propagation time has to do.
        waited = (probe is None or probe.result == UNREACHABLE) and (
            now - robot.staged_at >= settings.propagation
        )
        if accepted or waited:
            robot = robots.promote(robot, now, overlap)
    intervals = [r.rotation.interval for r in granting if r.rotation.interval is not None]
    due = bool(intervals) and now - robot.current.created >= min(intervals)
    if any(r.rotate_request for r in granting) or due:
        robot = robots.stage(robot, now, generators)
    if robot.staged is not None and robot.staged_at is not None:
        elapsed = now - robot.staged_at
        # Back off: a server too old to say which hash it holds is probed with a login,
        # a failed one until it reloads, which must not trip its limiter.
        again = now + min(settings.probe_interval_max, max(2.0, elapsed / 4))
        if probe is not None and probe.result == UNREACHABLE:
            # Unreachable may be one slow answer: ask again, and promote by time at the latest.
            again = min(again, robot.staged_at + settings.propagation)
        deadlines.append(again)
    if robot.previous_until is not None:
        deadlines.append(robot.previous_until)
    if intervals:
        deadlines.append(robot.current.created + min(intervals))
    return robot, deadlines


def _policy(
    target: Target,
    state: Mapping[str, robots.Robot],
    granted: Mapping[tuple[str, str], Sequence[models.Repository]],
    repositories: Iterable[models.Repository],
) -> Policy:
    peers = [state[key] for key in target.peers if key in state]
    entries = []
    for (mode, namespace), granting in sorted(granted.items()):
        robot = state[robots.robot_key(mode, namespace)]
        access = tuple((path, robots.ACTIONS[mode]) for path in sorted({r.path for r in granting}))
        for credential in robot.accounts:
            entries.append((credential.name, credential.hash, access))
    return Policy(
        admins=tuple(sorted({*target.admins, *(p.current.name for p in peers)})),
        users=tuple(sorted((p.current.name, p.current.hash) for p in peers)),
        robots=tuple(sorted(entries)),
        rules=tuple(_rule(r) for r in sorted(repositories, key=lambda r: r.path) if _has_rule(r)),
    )


def _has_rule(repository: models.Repository) -> bool:
    """Whether the path needs a rule in the policy (cheaper than building it: asked of
    every Repository on every pass)."""
    retention = repository.retention
    return (
        repository.visibility == "public"
        or bool(repository.immutable_tags)
        or (
            retention is not None
            and (retention.keep_last is not None or retention.untagged_days is not None)
        )
        or repository.quota is not None
    )


def _rule(repository: models.Repository) -> Rule:
    """What the server enforces for the path itself: anonymous pull, tag rules, quota."""
    retention = repository.retention
    keep_last = retention.keep_last if retention is not None else None
    quota = repository.quota
    return Rule(
        repository.path,
        anonymous_pull=repository.visibility == "public",
        immutable_tags=repository.immutable_tags,
        keep_last=keep_last,
        protect=retention.protect if retention is not None and keep_last is not None else (),
        untagged_days=retention.untagged_days if retention is not None else None,
        quota_storage=quota.storage if quota is not None else None,
        quota_tags=quota.tags if quota is not None else None,
    )


@dataclasses.dataclass(frozen=True)
class Stored:
    """What the policy stored in the API server grants (rendering.policy.read_stored):
    when a new one cannot be written, this one stays in force."""

    accounts: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> hash
    grants: frozenset[tuple[str, str]] = frozenset()  # (account, path)
    rules: frozenset[Rule] = frozenset()

    def holds(self, credential: robots.Credential) -> bool:
        return self.accounts.get(credential.name) == credential.hash


def in_force(result: Plan, stored: Stored) -> tuple[frozenset[SecretKey], frozenset[str]]:
    """With the stored policy in force instead of the planned one: the Secrets that may
    still be written (their credential is in it) and the Repositories whose grants are
    not (all) in it."""
    writable = set()
    missing = set()
    for key, desired in result.secrets.items():
        credential = result.robots[desired.robot].current
        if stored.holds(credential):
            writable.add(key)
        for name in desired.repositories:
            repository = result.active.get(name)
            if repository is None:
                continue
            if not stored.holds(credential) or (credential.name, repository.path) not in (
                stored.grants
            ):
                missing.add(name)
    for name, repository in result.active.items():
        if _has_rule(repository) and _rule(repository) not in stored.rules:
            missing.add(name)
    return frozenset(writable), frozenset(missing)


def access_condition(error: str | None, shards: int = 1) -> Condition:
    """The Registry's AccessApplied: whether its policy (and robots) could be written."""
    if error is not None:
        return Condition(ACCESS_APPLIED, "False", "PolicyNotWritten", error)
    # No counts that move with every Repository: a new message is a status write.
    return Condition(
        ACCESS_APPLIED,
        "True",
        "PolicyWritten",
        "the policy holds every Repository's grants"
        + (f" ({shards} shards)" if shards > 1 else ""),
    )


def newest_staged(stored: Mapping[str, robots.Robot]) -> robots.Robot | None:
    """The robot whose staged credential was written last: if the server accepts that
    one, it has loaded a policy holding every credential staged before it."""
    staged = [r for r in stored.values() if r.staged is not None and r.staged_at is not None]
    return max(staged, key=lambda r: (r.staged_at or 0.0, r.key), default=None)


def dockerconfigjson(hosts: Sequence[str], credential: robots.Credential) -> dict[str, Any]:
    """The same credential under every host: a kubelet looks the image's host up."""
    auth = base64.b64encode(f"{credential.name}:{credential.password}".encode()).decode()
    entry = {"username": credential.name, "password": credential.password, "auth": auth}
    return {"auths": {host: dict(entry) for host in hosts}}


# --- statuses -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Written:
    """What writing the plan achieved."""

    secrets: frozenset[tuple[str, str]]  # (namespace, name) holding the current credential
    foreign: Mapping[tuple[str, str], str]  # (namespace, name) -> why it was not written
    missing_service_accounts: Mapping[tuple[str, str], tuple[str, ...]] = dataclasses.field(
        default_factory=dict
    )
    # Why the policy could not be written (None: it was), and the Repositories whose
    # grants are therefore not in force.
    policy_error: str | None = None
    not_in_force: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Granted:
    """What the plan and writing it achieved for one Repository."""

    namespaces: Mapping[str, tuple[str, ...]]  # mode -> namespaces holding its Secret
    rotated_at: float | None  # the latest rotation (or creation) of its robots
    rotating: tuple[robots.Robot, ...]  # its robots in the middle of a rotation
    problems: tuple[str, ...]  # Secrets that could not be written, and why
    missing: tuple[str, ...]  # ServiceAccounts to name the Secret in that do not exist yet


def granted(repository: models.Repository, result: Plan, written: Written) -> Granted:
    name = repository.owner.name
    namespaces: dict[str, list[str]] = {robots.PULL: [], robots.PUSH: []}
    rotated: list[float] = []
    rotating: list[robots.Robot] = []
    for namespace, secret in result.secrets_of.get(name, ()):
        desired = result.secrets[(namespace, secret)]
        if (namespace, secret) in written.secrets:
            namespaces[desired.mode].append(namespace)
        robot = result.robots.get(desired.robot)
        if robot is not None:
            rotated.append(robot.rotated_at or robot.current.created)
            if robot.rotating:
                rotating.append(robot)

    problems = [
        f"Secret {ns}/{secret}: {why}"
        for ns, secret in result.secrets_of.get(name, ())
        if (why := written.foreign.get((ns, secret))) is not None
    ]
    problems += [
        f"Secret {item} is wanted for pull by another Repository; push access there is not written"
        for item in result.secret_name_clashes.get(name, ())
    ]
    missing = [
        f"ServiceAccount {ns}/{sa} does not exist yet"
        for ns, secret in result.secrets_of.get(name, ())
        for sa in written.missing_service_accounts.get((ns, secret), ())
    ]
    return Granted(
        namespaces={mode: tuple(found) for mode, found in namespaces.items()},
        rotated_at=max(rotated) if rotated else None,
        rotating=tuple(rotating),
        problems=tuple(problems),
        missing=tuple(missing),
    )


def repository_status(
    repository: models.Repository,
    target: Target | None,
    result: Plan,
    written: Written,
    target_reason: tuple[str, str] = ("RegistryNotFound", ""),
    observed_usage: usage.Observation | None = None,
) -> tuple[dict[str, Any], list[Condition]]:
    """The status fields (without conditions' bookkeeping) and the conditions."""
    name = repository.owner.name
    done = granted(repository, result, written)
    fields: dict[str, Any] = {
        "observedGeneration": repository.generation,
        "pullSecretNamespaces": list(done.namespaces[robots.PULL]),
        "pushSecretNamespaces": list(done.namespaces[robots.PUSH]),
    }
    if repository.pull:
        fields["pullSecretName"] = _secret_name(repository, robots.PULL, repository.pull)
    if repository.push:
        fields["pushSecretName"] = _secret_name(repository, robots.PUSH, repository.push)
    if done.rotated_at is not None:
        fields["credentialsRotatedAt"] = rfc3339(done.rotated_at)

    conflict = result.conflicts.get(name)
    holds = name in result.active
    unavailable = None if target is not None else target_reason
    if unavailable is None and holds and name in written.not_in_force:
        unavailable = (
            "PolicyNotWritten",
            "the registry's policy could not be written, so this grant is not in force: "
            + (written.policy_error or "unknown error"),
        )
    found = [
        ready_condition(unavailable, conflict, holds, done),
        path_conflict_condition(conflict, holds),
        rotating_condition(done.rotating),
    ]
    rules = tag_rules_condition(
        repository, enforced=holds and target is not None and name not in written.not_in_force
    )
    if rules is not None:
        found.append(rules)
    if holds and target is not None:  # the path's figures are this Repository's to show
        fields.update(usage.status_fields(repository.path, observed_usage))
        quota = usage.quota_condition(repository, observed_usage)
        if quota is not None:
            found.append(quota)
    return fields, found


def ready_condition(
    unavailable: tuple[str, str] | None, conflict: str | None, holds: bool, done: Granted
) -> Condition:
    """`unavailable`: why the Registry cannot be granted access to (None: it can)."""
    if unavailable is not None:
        return Condition(READY, "False", *unavailable)
    if not holds:
        return Condition(READY, "False", "PathConflict", conflict or "")
    if done.problems:
        return Condition(READY, "False", "SecretConflict", "; ".join(done.problems[:5]))
    counts = (
        f"pull Secrets in {len(done.namespaces[robots.PULL])} namespaces, "
        f"push Secrets in {len(done.namespaces[robots.PUSH])}"
    )
    if done.missing:
        counts += "; " + "; ".join(done.missing[:5])
    return Condition(READY, "True", "Granted", counts)


def path_conflict_condition(conflict: str | None, holds: bool) -> Condition:
    if conflict is None:
        return Condition(PATH_CONFLICT, "False", "NoConflict", "")
    return Condition(PATH_CONFLICT, "True", "KeepsPath" if holds else "PathHeldByOther", conflict)


def rotating_condition(rotating: Sequence[robots.Robot]) -> Condition:
    if not rotating:
        return Condition(ROTATING, "False", "Idle", "")
    staged = [r for r in rotating if r.staged is not None]
    if staged:
        return Condition(
            ROTATING,
            "True",
            "WaitingForServer",
            f"new credentials for {len(staged)} robots wait until the registry "
            "server accepts them before they are handed out",
        )
    until = max(r.previous_until or 0.0 for r in rotating)
    return Condition(
        ROTATING,
        "True",
        "OldCredentialsValid",
        "new credentials are handed out; the old ones stay valid until " + rfc3339(until),
    )


def tag_rules_condition(repository: models.Repository, enforced: bool) -> Condition | None:
    """Whether the server enforces the Repository's tag rules (`enforced`: the policy
    holds them); None when it has none."""
    if not repository.immutable_tags and repository.retention is None:
        return None  # most Repositories: no rule to build (10,000 of them per pass)
    rule = _rule(repository)
    if rule.immutable_tags or rule.keep_last is not None or rule.untagged_days is not None:
        told = []
        if rule.immutable_tags:
            told.append("immutable tags " + ", ".join(rule.immutable_tags))
        if rule.keep_last is not None:
            kept = f"retention keeps the last {rule.keep_last} tags"
            told.append(
                kept + (" and tags matching " + ", ".join(rule.protect) if rule.protect else "")
            )
        if rule.untagged_days is not None:
            told.append(f"untagged manifests go after {rule.untagged_days} days")
        if enforced:
            return Condition(TAG_RULES, "True", "InPolicy", "; ".join(told))
        return Condition(
            TAG_RULES,
            "False",
            "NotInPolicy",
            "not enforced: another Repository holds the path or the Registry is missing",
        )
    if repository.retention is not None:
        return Condition(
            TAG_RULES,
            "False",
            "NothingToEnforce",
            "retention without keepLast or untaggedDays keeps everything; protect has no"
            " effect alone",
        )
    return None
