"""A policy split into shards: the format, merging, and reloading a set of files that a
kubelet updates one Secret at a time (never half a policy applied)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from registry_server.auth import policy, scopes
from registry_server.auth.reloading import (
    AuthFiles,
    Inconsistent,
    LoadError,
    PolicyReader,
    WatchedFile,
)

HASH = "$2b$05$" + "b" * 53
OTHER_HASH = "$2b$05$" + "c" * 53
SHARDS = 4


def robot(name: str, *paths: str, secret_hash: str = HASH) -> dict[str, Any]:
    return {
        "name": name,
        "secret_hash": secret_hash,
        "access": [{"repository": p, "actions": ["pull"]} for p in paths],
    }


def shard_bytes(document: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(document).encode(), mtime=0)


def generation(g: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Generation `g` of a split policy: robot `gen<g>` may pull `g<g>/s<i>` from every
    shard i, so a merged policy tells which generation each of its shards came from."""
    files = {
        f"policy-{i}.json.gz": shard_bytes({"robots": [robot(f"gen{g}", f"g{g}/s{i}")]})
        for i in range(SHARDS)
    }
    main = {
        "version": 1,
        "admins": ["admin"],
        "shards": [
            {"file": name, "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(files.items())
        ],
    }
    return main, files


class Mount:
    """A projected volume as the kubelet writes it: files in `..<stamp>/`, each name a
    symlink through `..data`, which is swapped atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.count = 0

    def publish(self, files: dict[str, bytes]) -> None:
        self.count += 1
        stamp = self.root / f"..snap.{self.count}"
        stamp.mkdir()
        for name, data in files.items():
            (stamp / name).write_bytes(data)
        link = self.root / "..data"
        old = os.readlink(link) if link.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, link)
        for name in files:
            entry = self.root / name
            if not entry.is_symlink():
                entry.symlink_to(Path("..data") / name)
        if old is not None:
            for path in (self.root / old).iterdir():
                path.unlink()
            (self.root / old).rmdir()

    @property
    def main(self) -> Path:
        return self.root / "policy.yaml"


def snapshot(main: dict[str, Any], files: dict[str, bytes]) -> dict[str, bytes]:
    return {"policy.yaml": json.dumps(main).encode(), **files}


def generation_of(found: policy.Policy) -> int:
    """The one generation every shard of `found` comes from (fails on a mix)."""
    robots = {name for name, account in found.accounts.items() if account.kind == "robot"}
    assert len(robots) == 1, f"robots of several generations merged: {sorted(robots)}"
    (name,) = robots
    g = int(name.removeprefix("gen"))
    for i in range(SHARDS):
        assert found.actions(name, f"g{g}/s{i}") == {"pull"}, f"shard {i} of {g} missing"
    return g


# --- the format --------------------------------------------------------------------------


def test_main_file_lists_shards() -> None:
    main, _ = generation(1)
    parsed, shards = policy.parse_main(main)
    assert parsed.admins == {"admin"}
    assert [s.file for s in shards] == [f"policy-{i}.json.gz" for i in range(SHARDS)]
    with pytest.raises(policy.PolicyError, match="unknown keys"):
        policy.parse({"shards": []})  # a shard cannot list shards


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"file": "../x", "sha256": "0" * 64}, "file"),
        ({"file": "a/b", "sha256": "0" * 64}, "file"),
        ({"file": "..data", "sha256": "0" * 64}, "file"),
        ({"file": "x.gz", "sha256": "ABC"}, "sha256"),
        ({"file": "x.gz"}, "missing keys"),
    ],
)
def test_bad_shard_entries(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(policy.PolicyError, match=message):
        policy.parse_main({"shards": [entry]})


def test_duplicate_shard_files_are_refused() -> None:
    entry = {"file": "x.json", "sha256": "0" * 64}
    with pytest.raises(policy.PolicyError, match="distinct"):
        policy.parse_main({"shards": [entry, entry]})


def test_merge_joins_a_robot_spread_over_shards() -> None:
    a = policy.parse({"robots": [robot("r", "team/a")], "rules": [{"repository": "team/a"}]})
    b = policy.parse({"robots": [robot("r", "team/b")], "admins": ["boss"]})
    merged = policy.merge([("main", policy.Policy()), ("a", a), ("b", b)])
    assert merged.actions("r", "team/a") == merged.actions("r", "team/b") == {"pull"}
    assert merged.admins == {"boss"}
    assert len(merged.rules) == 1


def test_merge_refuses_one_name_with_two_hashes() -> None:
    a = policy.parse({"robots": [robot("r", "team/a")]})
    b = policy.parse({"robots": [robot("r", "team/b", secret_hash=OTHER_HASH)]})
    with pytest.raises(policy.PolicyError, match="'r' differs"):
        policy.merge([("a", a), ("b", b)])


def test_exact_names_are_looked_up_and_patterns_still_match() -> None:
    """The index (exact names in a dictionary) answers like a scan of every grant."""
    rng = random.Random(7)
    names = [f"team-{t}/svc-{s}" for t in range(4) for s in range(6)]
    patterns = ["team-1/*", "team-2/**", "**", "team-?/svc-1", "team-3/svc-*"]
    robots = [robot(f"r{i}", *rng.sample(names + patterns, 5)) for i in range(8)]
    rules = [
        {"repository": p, "pull": [f"r{rng.randrange(8)}"], "anonymous_pull": rng.random() < 0.2}
        for p in rng.sample(names + patterns, 8)
    ]
    parsed = policy.parse({"robots": robots, "rules": rules})
    for who in [None, *(f"r{i}" for i in range(8))]:
        for name in [*names, "team-1/x/y", "other"]:
            expected: set[str] = set()
            for rule in parsed.rules:
                if scopes.compile_pattern(rule.repository).match(name):
                    expected |= rule.actions_for(who)
            for grant in parsed.robot_access.get(who or "", ()):
                if scopes.compile_pattern(grant.repository).match(name):
                    expected |= grant.actions
            assert parsed.actions(who, name) == expected, (who, name)


# --- reading and reloading ---------------------------------------------------------------


def test_reads_the_shards_of_one_snapshot(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "policy")
    mount.publish(snapshot(*generation(1)))
    assert generation_of(PolicyReader()(mount.main)) == 1


def test_a_mismatched_shard_is_inconsistent_not_an_error(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "policy")
    main, files = generation(2)
    _, old_files = generation(1)
    mount.publish(snapshot(main, {**files, "policy-3.json.gz": old_files["policy-3.json.gz"]}))
    with pytest.raises(Inconsistent, match="policy-3"):
        PolicyReader()(mount.main)
    missing = dict(files)
    del missing["policy-0.json.gz"]
    mount.publish(snapshot(main, missing))
    with pytest.raises(Inconsistent, match="policy-0"):
        PolicyReader()(mount.main)


def test_a_broken_shard_is_an_error(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "policy")
    bad = b"not gzip"
    main = {"shards": [{"file": "policy-0.json.gz", "sha256": hashlib.sha256(bad).hexdigest()}]}
    mount.publish(snapshot(main, {"policy-0.json.gz": bad}))
    with pytest.raises(LoadError, match="gzip") as caught:
        PolicyReader()(mount.main)
    assert not isinstance(caught.value, Inconsistent)


def test_reload_waits_for_a_consistent_set(tmp_path: Path) -> None:
    """New main file with an old shard, then old main file with a new shard: the policy
    in force stays generation 1 as a whole until generation 2 is complete."""
    mount = Mount(tmp_path / "policy")
    main1, files1 = generation(1)
    main2, files2 = generation(2)
    mount.publish(snapshot(main1, files1))
    auth = AuthFiles(None, mount.main)
    first = auth.load()
    assert generation_of(first.policy) == 1

    mixed = {**files2, "policy-1.json.gz": files1["policy-1.json.gz"]}
    mount.publish(snapshot(main2, mixed))
    auth.poll()
    assert not auth.poll()
    assert auth.directory is first
    mount.publish(snapshot(main1, files2))
    auth.poll()
    assert not auth.poll()
    assert auth.directory is first
    assert not auth.poll()  # an unchanged inconsistent set is not read again and again

    mount.publish(snapshot(main2, files2))
    auth.poll()
    assert auth.poll()
    assert generation_of(auth.directory.policy) == 2


def test_a_shard_changed_under_an_unchanged_main_file_is_noticed(tmp_path: Path) -> None:
    """Plain files (no kubelet): a writer that puts the main file first and the shard
    after is read once the shard matches, though the main file did not change again."""
    directory = tmp_path / "plain"
    directory.mkdir()
    main1, files1 = generation(1)
    main2, files2 = generation(2)
    for name, data in snapshot(main1, files1).items():
        (directory / name).write_bytes(data)
    auth = AuthFiles(None, directory / "policy.yaml")
    auth.load()
    (directory / "policy.yaml").write_bytes(json.dumps(main2).encode())
    auth.poll()
    assert not auth.poll()
    assert generation_of(auth.directory.policy) == 1
    for name, data in files2.items():
        (directory / name).write_bytes(data)
    auth.poll()
    assert auth.poll()
    assert generation_of(auth.directory.policy) == 2


def test_startup_waits_for_a_consistent_set(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "policy")
    _, files1 = generation(1)
    main2, files2 = generation(2)
    mount.publish(snapshot(main2, files1))
    reader = PolicyReader()
    with pytest.raises(LoadError, match="gave up"):
        WatchedFile("policy", mount.main, reader, reader.fingerprint).load(wait=0.3)

    timer = threading.Timer(0.3, lambda: mount.publish(snapshot(main2, files2)))
    timer.start()
    try:
        assert generation_of(AuthFiles(None, mount.main).load().policy) == 2
    finally:
        timer.join()


def test_never_half_a_policy_under_random_kubelet_updates(tmp_path: Path) -> None:
    """A writer publishes snapshots whose main file and shards each come from a random
    recent generation (a kubelet whose Secret caches lag independently), now and then a
    complete one; a poller reloads all the while. Every policy ever in force is one
    whole generation, and the last complete one is reached."""
    rng = random.Random(18)
    mount = Mount(tmp_path / "policy")
    generations = {g: generation(g) for g in range(1, 31)}
    mount.publish(snapshot(*generations[1]))
    auth = AuthFiles(None, mount.main, interval_seconds=0)
    auth.load()
    seen = [generation_of(auth.directory.policy)]
    done = threading.Event()

    def poller() -> None:
        while not done.is_set():
            if auth.poll():
                seen.append(generation_of(auth.directory.policy))

    thread = threading.Thread(target=poller)
    thread.start()
    try:
        for g in range(2, 31):
            for _ in range(3):
                main_g = rng.choice([g, g - 1])
                files = {
                    name: generations[rng.choice([g, g - 1, max(1, g - 2)])][1][name]
                    for name in generations[g][1]
                }
                mount.publish(snapshot(generations[main_g][0], files))
                time.sleep(0.003)
            if g % 5 == 0:
                mount.publish(snapshot(*generations[g]))
                time.sleep(0.01)
        mount.publish(snapshot(*generations[30]))
        deadline = time.monotonic() + 10
        while seen[-1] != 30 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        thread.join()
    assert seen[-1] == 30
    assert seen == sorted(seen)  # whole generations, never going back
