"""What handlers need, stored on the aiohttp application under typed keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from registry_server.auth.model import Authorizer
from registry_server.events.replicator import Replicator
from registry_server.http.clients import ClientAddresses
from registry_server.services.blobs import BlobService
from registry_server.services.browse import BrowseService
from registry_server.services.discovery import DiscoveryService
from registry_server.services.manifests import ManifestService
from registry_server.services.pull_through import PullThrough
from registry_server.services.usage import UsageService
from registry_server.storage.index import MetadataIndex
from registry_server.storage.space import SpaceMonitor


@dataclass(frozen=True)
class Services:
    blobs: BlobService
    manifests: ManifestService
    discovery: DiscoveryService
    index: MetadataIndex
    auth: Authorizer
    max_manifest_bytes: int
    usage: UsageService
    browse: BrowseService
    replicator: Replicator | None = None
    # Some worker of this server replicates (this one when ``replicator`` is set).
    replicating: bool = False
    external_url: str = ""
    region: str = ""
    clients: ClientAddresses = field(default_factory=ClientAddresses)
    space: SpaceMonitor = field(default_factory=lambda: SpaceMonitor(None))
    pull_through: PullThrough | None = None  # upstreams mirrored on demand
    body_idle_seconds: float = 60.0  # http.body_idle_timeout_seconds


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def client_address(request: web.Request) -> str:
    """The address the failure limiter and the logs know this request's client by."""
    return services(request).clients.of(request)
