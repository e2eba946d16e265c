"""Composition root: build_app(config) wires storage, auth, services and routes."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from registry_server import scheduled_backup
from registry_server.auth.failure_sharing import FailureSharing
from registry_server.auth.model import Authorizer, OpenAccess, TagRuleSource
from registry_server.auth.ratelimit import FailureLimiter
from registry_server.config import Config, ConfigError, StorageConfig
from registry_server.events import notifier
from registry_server.events.background import run_elected
from registry_server.events.replicator import Replicator
from registry_server.events.upstream_fetching import UpstreamFetcher
from registry_server.http import accounts, replication, routes, token, ui, usage
from registry_server.http.clients import ClientAddresses
from registry_server.http.context import SERVICES, Services
from registry_server.http.errors import error_middleware
from registry_server.http.health import metrics_app, metrics_middleware
from registry_server.protocol.quotas import NO_QUOTA, Quota
from registry_server.protocol.tag_rules import NO_RULES, TagRules
from registry_server.protocol.upstreams import Mirror
from registry_server.services import usage as usage_service
from registry_server.services.blobs import BlobService
from registry_server.services.browse import BrowseService
from registry_server.services.discovery import DiscoveryService
from registry_server.services.gc import GarbageCollector, scheduled_rounds
from registry_server.services.manifests import ManifestService
from registry_server.services.pull_through import PullThrough, Settings
from registry_server.services.retention import RetentionService
from registry_server.services.usage import UsageService
from registry_server.storage.blobstore import BlobStore
from registry_server.storage.driver import StorageDriver
from registry_server.storage.election import Election, LocalElection
from registry_server.storage.fetch_locks import (
    FetchLocks,
    FileFetchLocks,
    NoFetchLocks,
    PostgresFetchLocks,
)
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.index import MetadataIndex
from registry_server.storage.records import TagRecord
from registry_server.storage.s3 import S3Driver
from registry_server.storage.space import SpaceMonitor
from registry_server.storage.sqlite_index import SqliteIndex
from registry_server.storage.tasks import cancel_and_wait

if TYPE_CHECKING:
    from registry_server.auth.session_ends import SessionEnds
    from registry_server.storage.postgres_listener import ChangeListener

# aiohttp's own bound on request.read()/json()/post(). Nothing reads a body that way (blobs
# stream; manifests, forms and replication messages go through http.body.read_limited with
# limits of their own), so this is only a net, and it never applies to streamed bodies.
_CLIENT_MAX_SIZE = 1 << 20
# Seconds between refreshes of the per-repository usage gauges.
_USAGE_REFRESH = 10.0


def build_authorizer(config: Config) -> Authorizer:
    if config.auth is None:
        return OpenAccess()
    from registry_server.auth import configured

    return configured.build(config.auth, config.http.external_url)


def build_space(config: Config) -> SpaceMonitor:
    """The full-volume gate over storage.root, when something is stored there (blobs, or
    the SQLite index, which alone needs the reserve)."""
    sqlite = config.metadata.driver != "postgresql"
    if config.storage.driver != "filesystem" and not sqlite:
        return SpaceMonitor(None)
    reserve = config.storage.reserve_bytes if sqlite else 0
    return SpaceMonitor(config.storage.root, config.storage.min_free_bytes, reserve)


def build_driver(storage: StorageConfig, space: SpaceMonitor | None = None) -> StorageDriver:
    """The blob storage driver the config names; an unknown name is an error, never a
    fallback (config validation refuses it first)."""
    if storage.driver == "filesystem":
        return FilesystemDriver(storage.root, space.note_full if space is not None else None)
    if storage.driver == "s3":
        assert storage.s3 is not None
        s3 = storage.s3
        access_key, secret_key = s3.credentials()
        return S3Driver(
            bucket=s3.bucket,
            endpoint=s3.endpoint,
            region=s3.region,
            prefix=s3.prefix,
            access_key=access_key,
            secret_key=secret_key,
            ca_file=s3.ca_file,
            tls_verify=s3.tls_verify,
            path_style=s3.path_style,
            part_size=s3.part_size,
            redirect=s3.redirect,
            redirect_expiry_seconds=s3.redirect_expiry_seconds,
        )
    raise ConfigError(f"storage.driver: unknown storage driver {storage.driver!r}")


def build_index(
    config: Config, consumers: list[str], space: SpaceMonitor | None = None
) -> MetadataIndex:
    """The metadata index ``metadata.driver`` names (before the event loop runs: the
    PostgreSQL one migrates its schema here, as SQLite creates its own)."""
    region = config.replication.region
    pg = config.metadata.postgresql
    if config.metadata.driver == "postgresql" and pg is not None:
        from registry_server.storage.postgres_index import PostgresIndex

        return PostgresIndex(pg.connection_string(), region, consumers, pg.pool_size)
    return SqliteIndex(config.storage.root / "index.db", region, consumers, space)


def build_election(config: Config) -> Election:
    """Who runs what must run once (GC, retention, each peer, each webhook endpoint):
    with PostgreSQL, the replica elected through the database; with SQLite (one pod),
    this process."""
    pg = config.metadata.postgresql
    if config.metadata.driver == "postgresql" and pg is not None:
        from registry_server.storage.postgres_election import PostgresElection

        return PostgresElection(pg.connection_string(), config.metadata.replica())
    return LocalElection(config.metadata.replica())


def build_listener(config: Config, on_change: Callable[[], None]) -> ChangeListener | None:
    """With PostgreSQL, what wakes this process's delivery loops when another replica
    logs a change (SQLite's worker processes poll)."""
    pg = config.metadata.postgresql
    if config.metadata.driver != "postgresql" or pg is None:
        return None
    from registry_server.storage.postgres_listener import ChangeListener

    return ChangeListener(pg.connection_string(), config.metadata.replica(), on_change)


def build_pull_through(
    config: Config, store: BlobStore, index: MetadataIndex, worker_id: int
) -> PullThrough | None:
    """The pull-through cache over the configured upstreams, if any."""
    if not config.upstreams:
        return None
    mirrors = []
    for u in config.upstreams:
        parts = urlsplit(u.url)
        host = (parts.hostname or "").lower()
        # containerd's ?ns= names the host as images do: with its port when it has one.
        port = f"{host}:{parts.port}" if parts.port else host
        hosts = u.hosts or tuple(dict.fromkeys((u.prefix.lower(), host, port)))
        library = u.docker_library if u.docker_library is not None else u.prefix == "docker.io"
        mirrors.append(Mirror(u.name, u.prefix, hosts, library))
    return PullThrough(
        mirrors,
        {
            u.name: Settings(
                u.tag_ttl_seconds, u.timeout_seconds, u.keep_last, u.max_idle_days * 86400
            )
            for u in config.upstreams
        },
        {u.name: UpstreamFetcher(u, config.limits.max_manifest_bytes) for u in config.upstreams},
        store,
        index,
        config.limits.max_manifest_bytes,
        # Pull times for eviction, per worker, next to the blobs (filesystem storage).
        config.storage.root / "pull-through" if config.storage.driver == "filesystem" else None,
        worker_id,
        build_fetch_locks(config),
    )


def build_fetch_locks(config: Config) -> FetchLocks:
    """Claims on upstream blob fetches shared by the processes that could fetch the same
    blob: replicas through their database, workers of one pod through files beside the
    index."""
    pg = config.metadata.postgresql
    if config.metadata.driver == "postgresql" and pg is not None:
        return PostgresFetchLocks(pg.connection_string(), config.metadata.replica())
    if config.http.workers > 1:
        return FileFetchLocks(config.storage.root / "pull-through-fetching")
    return NoFetchLocks()


def build_failure_sharing(
    config: Config, auth: Authorizer, index: MetadataIndex
) -> FailureSharing | None:
    """With several processes on one index (workers on SQLite, replicas on PostgreSQL),
    what makes their failed-authentication limits one."""
    limiter = getattr(auth, "limiter", None)
    shared = config.metadata.driver == "postgresql" or config.http.workers > 1
    if not shared or not isinstance(limiter, FailureLimiter):
        return None
    return FailureSharing(limiter, index)


def build_session_ends(
    config: Config, auth: Authorizer, index: MetadataIndex
) -> SessionEnds | None:
    """Where the web UI's logouts are recorded, when it can log people in."""
    if not config.ui.enabled or isinstance(auth, OpenAccess):
        return None
    from registry_server.auth.configured import ConfiguredAuthorizer
    from registry_server.auth.session_ends import SessionEnds

    if not isinstance(auth, ConfiguredAuthorizer):
        return None
    auth.session_ends = SessionEnds(index)
    return auth.session_ends


def _cached_here(pull_through: PullThrough | None) -> Callable[[str], bool]:
    """Repositories that replication leaves alone: the pull-through cache's. Each region
    fills its own cache from the upstream (a peer mirroring the same prefix would refuse
    the fills as pushes anyway)."""
    if pull_through is None:
        return lambda repo: False
    return lambda repo: pull_through.target(repo) is not None


def build_app(config: Config, worker_id: int = 0) -> web.Application:
    """The application for one worker process; worker 0 also competes for (and runs)
    the background tasks: replication, notifications, GC and retention."""
    space = build_space(config)
    driver = build_driver(config.storage, space)
    rep = config.replication
    endpoints = config.notifications.endpoints
    # The change log's consumers: each replication peer and each webhook endpoint.
    consumers = [p.name for p in rep.peers] + [notifier.cursor_name(e) for e in endpoints]
    index = build_index(config, consumers, space)
    store = BlobStore(driver, space)
    election = build_election(config) if worker_id == 0 else None
    pull_through = build_pull_through(config, store, index, worker_id)
    replicator = (
        Replicator(rep, index, store, election, _cached_here(pull_through))
        if rep.peers and election
        else None
    )
    notifications = (
        notifier.Notifier(config.notifications, index, _source(config, index.instance_id), election)
        if endpoints and election
        else None
    )
    auth = build_authorizer(config)
    failure_sharing = build_failure_sharing(config, auth, index)
    session_ends = build_session_ends(config, auth, index)

    def tag_rules(repository: str) -> TagRules:
        # Immutable tags and retention live in the policy file: none without one.
        return auth.tag_rules(repository) if isinstance(auth, TagRuleSource) else NO_RULES

    def quota(repository: str) -> Quota:
        return auth.quota(repository) if isinstance(auth, TagRuleSource) else NO_QUOTA

    wakers = [w.wake for w in (replicator, notifications) if w is not None]

    def on_change() -> None:
        for wake in wakers:
            wake()

    listener = build_listener(config, on_change) if wakers else None

    # The durable per-repository record the SQLite index can be rebuilt from.
    record = TagRecord(config.storage.root) if isinstance(index, SqliteIndex) else None
    svc = Services(
        pull_through=pull_through,
        blobs=BlobService(store, index, quota),
        manifests=ManifestService(
            index,
            config.limits.max_manifest_bytes,
            on_change=on_change,
            tag_rules=tag_rules,
            quota=quota,
            space=space,
            # With SQLite, what `berth-registry rebuild` rebuilds the index from.
            record=record,
        ),
        discovery=DiscoveryService(index),
        index=index,
        auth=auth,
        max_manifest_bytes=config.limits.max_manifest_bytes,
        usage=UsageService(index, quota),
        browse=BrowseService(index, tag_rules, quota),
        replicator=replicator,
        replicating=bool(rep.peers),
        external_url=config.http.external_url,
        region=rep.region,
        clients=ClientAddresses(config.http.trusted_proxies, config.http.forwarded_header),
        space=space,
        body_idle_seconds=config.http.body_idle_timeout_seconds,
    )
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware], client_max_size=_CLIENT_MAX_SIZE
    )
    app[SERVICES] = svc
    routes.add_routes(app, metrics=not config.http.metrics_addr)
    token.setup(app, config.http.relayed_hosts)
    replication.add_routes(app)
    accounts.add_routes(app)
    usage.add_routes(app)
    if config.ui.enabled:
        ui.add_routes(app)

    collector = GarbageCollector(
        store, index, config.gc.grace_seconds, config.limits.upload_purge_after_seconds
    )
    retention = RetentionService(
        index, tag_rules, on_change, record, cached=_cached_here(pull_through)
    )
    background: list[asyncio.Task[None]] = []

    async def collect_forever() -> None:
        # A round cut short by a crash left blobs the index still records in the trash;
        # their pulls fail until they are back, so not an interval (or forever) later.
        try:
            await collector.recover_trash()
        except Exception:
            logging.getLogger("registry_server.gc").exception("trash recovery failed")
        if config.gc.interval_seconds <= 0:  # no rounds: the term is held, and idle
            await asyncio.Event().wait()

        async def prompt() -> None:  # on a full volume, what deletes released, promptly
            try:
                await collector.run_once(sweep=False)
            except Exception:
                logging.getLogger("registry_server.gc").exception("gc failed")

        async def whole() -> None:
            # Eviction and retention first, so the collector already sees what they untagged.
            jobs: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("retention", retention.run_once),
                ("gc", collector.run_once),
            ]
            if pull_through is not None:
                jobs.insert(0, ("pull_through", pull_through.evict_once))
            for name, job in jobs:
                try:
                    await job()
                except Exception:  # the loop must outlive one bad round; it logs why
                    logging.getLogger(f"registry_server.{name}").exception(f"{name} failed")

        await scheduled_rounds(space.pressure, config.gc.interval_seconds, prompt, whole)

    async def start(_: web.Application) -> None:
        await space.start()
        await index.open()
        if failure_sharing is not None:
            background.append(asyncio.create_task(failure_sharing.run_forever()))
        if session_ends is not None:  # those ended before this process started, first
            await session_ends.sync_once()
            background.append(asyncio.create_task(session_ends.run_forever()))
        if election is not None:
            await election.start()
        if listener is not None:
            await listener.start()
        if replicator is not None:
            await replicator.start()
        if notifications is not None:
            await notifications.start()
        if election is not None:
            background.append(asyncio.create_task(run_elected(election, "gc", collect_forever)))
        if election is not None:  # worker 0
            background.append(
                asyncio.create_task(usage_service.refresh_forever(svc.usage, _USAGE_REFRESH))
            )
        if election is not None and config.backup.interval_seconds > 0:

            async def back_up_forever() -> None:
                await scheduled_backup.backup_forever(config.storage.root, config.backup)

            background.append(asyncio.create_task(run_elected(election, "backup", back_up_forever)))

    async def close(_: web.Application) -> None:
        await cancel_and_wait(background)
        if replicator is not None:
            await replicator.stop()
        if notifications is not None:
            await notifications.stop()
        if listener is not None:
            await listener.stop()
        if election is not None:  # last: the other replicas take over from here
            await election.stop()
        if pull_through is not None:
            await pull_through.close()
        await index.close()
        await space.stop()
        if isinstance(driver, S3Driver):
            await driver.close()

    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


def build_metrics_app(config: Config) -> web.Application | None:
    """The application of the separate metrics listener, when one is configured."""
    return metrics_app() if config.http.metrics_addr else None


def _source(config: Config, log_id: str) -> notifier.Source:
    """How events name this instance: its external URL when set, else its address."""
    addr = f"{socket.gethostname()}:{config.http.port}"
    base = config.http.external_url.rstrip("/") or f"{config.http.scheme}://{addr}"
    region = config.replication.region or socket.gethostname()
    return notifier.Source(addr, region, base, log_id)
