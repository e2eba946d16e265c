"""Kopf settings for Berth: our own prefixes, bounded watches, quiet framework events."""

from __future__ import annotations

import dataclasses
import logging

import kopf

PREFIX = "berth.dev"
POSTING_WORKERS = 16  # Kubernetes Events posted at once


@dataclasses.dataclass(frozen=True)
class Options:
    peering_name: str = "berth"
    watch_server_timeout: int = 300  # seconds; the API wants an integer
    request_timeout: float = 60.0


def build(options: Options = Options()) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    persistence = settings.persistence
    persistence.finalizer = f"{PREFIX}/finalizer"
    # Progress and the last-handled spec live in annotations, so `.status` is all ours.
    persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )

    # Watches end server-side well before any proxy would cut them, and a silent stream
    # is reconnected instead of trusted forever.
    settings.watching.server_timeout = options.watch_server_timeout
    settings.watching.client_timeout = options.watch_server_timeout + 30
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = options.request_timeout

    settings.peering.name = options.peering_name

    # Our handlers post the events an admin needs; Kopf's per-handler chatter stays in logs.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "berth-operator"
    settings.posting.event_name_prefix = "berth-"
    # Kopf posts the events of different objects at once, each on a connection of its
    # own (its connection pool has no limit), and every TLS connection holds a 256 KiB
    # buffer: thousands of Repositories granted in a burst held hundreds of connections
    # and megabytes each second (issue 18). A few posters keep up with a burst.
    settings.posting.worker_limit = POSTING_WORKERS
    return settings


# Event handlers only pass a watch event on to a reconcile (which logs what matters);
# their "succeeded" lines would be one per namespace, Secret or Deployment change; the
# node port claims' handler sees every Registry event.
QUIET_HANDLERS = (
    "Handler 'namespace'",
    "Handler 'repository'",
    "Handler 'node-claims'",
)


class _QuietEventHandlers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        return not (message.startswith(QUIET_HANDLERS) and message.endswith(" succeeded."))


def quiet_event_handlers(logger: logging.Logger | None = None) -> None:
    """Drop the per-event success lines of the watch-only handlers from Kopf's log."""
    (logger or logging.getLogger("kopf.objects")).addFilter(_QuietEventHandlers())
