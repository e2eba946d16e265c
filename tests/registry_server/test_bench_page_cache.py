"""bench.page_cache: which files leave the page cache before a measured push."""

from __future__ import annotations

from pathlib import Path

from bench import page_cache


def test_only_stored_blobs_are_dropped(tmp_path: Path) -> None:
    berth, distribution = tmp_path / "berth", tmp_path / "distribution"
    stored = [
        berth / "blobs" / "sha256" / "ab" / "ab12" / "data",
        distribution / "docker" / "registry" / "v2" / "blobs" / "sha256" / "cd" / "cd34" / "data",
    ]
    kept = [
        berth / "uploads" / "u1" / "data",  # an upload in flight
        berth / "index.db",
        distribution / "docker" / "registry" / "v2" / "repositories" / "r" / "data",
        tmp_path / "blobs" / "data",  # outside the roots
    ]
    for path in stored + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 4096)
    assert page_cache.evict_blobs(berth) + page_cache.evict_blobs(distribution) == len(stored)
    assert all(path.read_bytes() == b"x" * 4096 for path in stored + kept)
