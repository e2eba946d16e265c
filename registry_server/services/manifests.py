"""Manifest push, pull and delete."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from registry_server.protocol import digests, errors, manifests, names
from registry_server.protocol.quotas import NO_QUOTA, Quota
from registry_server.protocol.tag_rules import NO_RULES, TagRules
from registry_server.protocol.versions import Stamp
from registry_server.storage.index import ManifestRecord, MetadataIndex, NewManifest, Overtaken
from registry_server.storage.records import TagRecord
from registry_server.storage.space import SpaceMonitor


@dataclass(frozen=True)
class PushResult:
    digest: str
    subject: str | None


class ManifestService:
    def __init__(
        self,
        index: MetadataIndex,
        max_bytes: int,
        on_change: Callable[[], None] | None = None,
        tag_rules: Callable[[str], TagRules] | None = None,
        space: SpaceMonitor | None = None,
        record: TagRecord | None = None,
        quota: Callable[[str], Quota] | None = None,
    ) -> None:
        self.index = index
        # The durable per-repository record the index can be rebuilt from (SQLite only).
        self.record = record
        # Pushes are refused while the volume is full; deletes are not (storage.space).
        self.space = space or SpaceMonitor(None)
        self.max_bytes = max_bytes
        # The repository's immutable tags and retention, as the policy says right now.
        self.tag_rules = tag_rules or (lambda _repo: NO_RULES)
        # Its quota, likewise; only local pushes are held to it (a replicated change was
        # decided in the region it was pushed to).
        self.quota = quota or (lambda _repo: NO_QUOTA)
        # Called after a local change is committed (and logged), to wake replication.
        self._on_change = on_change or (lambda: None)

    async def put(
        self,
        repo: str,
        reference: str,
        body: bytes,
        content_type: str | None,
        extra_tags: Sequence[str] = (),
        stamp: Stamp | None = None,
        actor: str | None = None,
        replicated: bool = False,
        stored_version: int | None = None,
    ) -> PushResult:
        """Validate and store a manifest; ``stamp`` marks a change replicated from a peer,
        ``replicated`` a manifest a peer sends by digest (a platform, a referrer): neither
        is held to the quota, logged for other peers or told to webhooks (the region that
        took the push did all that). ``stored_version`` is a referrer's clock version when
        first stored, which that peer sends: one deleted since is not stored again, and
        the peer is answered as if it were (the delete reaches it too). ``actor`` is the
        account pushing."""
        self.space.require_writable()
        if len(body) > self.max_bytes:
            raise errors.RegistryError(
                errors.MANIFEST_TOO_LARGE, detail={"size": len(body), "limit": self.max_bytes}
            )
        ref = names.parse_reference(reference)
        tags = [names.validate_tag(t) for t in extra_tags]
        if isinstance(ref, digests.Digest):
            digest = digests.of_bytes(body, ref.algorithm)
            if digest != ref:
                raise errors.RegistryError(
                    errors.DIGEST_INVALID, detail={"expected": str(ref), "actual": str(digest)}
                )
        else:
            digest = digests.of_bytes(body)
            tags.insert(0, ref)
        if replicated and tags:  # a tag moved by a peer carries the push's stamp
            raise errors.RegistryError(errors.DENIED, detail={"reason": "a tag needs a stamp"})
        parsed = manifests.parse(body, content_type)
        subject = str(parsed.subject.digest) if parsed.subject else None
        try:
            await self.index.put_manifest(
                repo,
                NewManifest(
                    digest=str(digest),
                    media_type=parsed.media_type,
                    content=body,
                    artifact_type=parsed.artifact_type,
                    subject=subject,
                    annotations=json.dumps(parsed.annotations) if parsed.annotations else None,
                    blob_refs=[str(d.digest) for d in parsed.blobs],
                    child_refs=[str(d.digest) for d in parsed.children],
                ),
                tags,
                stamp,
                immutable=self._immutable(repo, tags),
                required_blobs=parsed.required_blobs(),
                required_manifests=list(dict.fromkeys(str(d.digest) for d in parsed.children)),
                actor=actor,
                quota=self.quota(repo) if stamp is None and not replicated else None,
                replicated=replicated,
                stored_version=stored_version,
            )
        except Overtaken:
            return PushResult(str(digest), subject)
        if self.record is not None:
            # After the commit, before the answer: what the client is told is recorded.
            stamps = await self.index.tag_stamps(repo, tags)
            await self.record.manifest(repo, str(digest), parsed.media_type, body, stamps)
        if stamp is None and not replicated:
            self._on_change()
        return PushResult(str(digest), subject)

    async def _record_delete(self, repo: str, digest: str | None, tags: Sequence[str]) -> None:
        if self.record is not None:
            stamps = await self.index.tag_stamps(repo, tags)
            await self.record.deleted(repo, digest, stamps)

    def _immutable(self, repo: str, tags: Sequence[str]) -> list[str]:
        rules = self.tag_rules(repo)
        return [tag for tag in tags if rules.is_immutable(tag)]

    async def resolve(self, repo: str, reference: str) -> str:
        if not digests.looks_like_digest(reference) and not names.is_valid_tag(reference):
            # No manifest can have this name: for a read that is "unknown", not "bad request".
            raise errors.RegistryError(errors.MANIFEST_UNKNOWN, detail={"tag": reference[:200]})
        ref = names.parse_reference(reference)
        if isinstance(ref, digests.Digest):
            return str(ref)
        digest = await self.index.resolve_tag(repo, ref)
        if digest is None:
            raise errors.RegistryError(errors.MANIFEST_UNKNOWN, detail={"tag": ref})
        return digest

    async def get(self, repo: str, reference: str, content: bool = True) -> ManifestRecord:
        digest = await self.resolve(repo, reference)
        record = await self.index.get_manifest(repo, digest, content)
        if record is None:
            raise errors.RegistryError(errors.MANIFEST_UNKNOWN, detail={"reference": reference})
        return record

    async def delete(
        self, repo: str, reference: str, stamp: Stamp | None = None, actor: str | None = None
    ) -> None:
        ref = names.parse_reference(reference)
        rules = self.tag_rules(repo)
        if isinstance(ref, digests.Digest):
            # A replicated delete was decided where it was made (see put).
            guard = rules.is_immutable if stamp is None and rules.immutable else None
            # While the volume is full no push is in flight: its layers may go at once.
            release = self.space.full
            # The tags the delete's own transaction removed, for the record: read before
            # it, a tag moved onto the manifest meanwhile was left live in the record.
            tagged: list[str] = []
            if not await self.index.delete_manifest(
                repo, str(ref), stamp, actor, guard, release, tagged
            ):
                raise errors.RegistryError(errors.MANIFEST_UNKNOWN, detail={"digest": str(ref)})
            # A replicated delete may spare the manifest (an index here lists it): then
            # only its tags went.
            spared = (
                stamp is not None
                and self.record is not None
                and (await self.index.get_manifest(repo, str(ref), content=False) is not None)
            )
            await self._record_delete(repo, None if spared else str(ref), tagged)
        # An unknown tag stays MANIFEST_UNKNOWN, immutable or not.
        elif not await self.index.delete_tag(
            repo, ref, stamp, actor, stamp is None and rules.is_immutable(ref)
        ):
            raise errors.RegistryError(errors.MANIFEST_UNKNOWN, detail={"tag": ref})
        else:
            await self._record_delete(repo, None, [ref])
        if stamp is None:
            self._on_change()
