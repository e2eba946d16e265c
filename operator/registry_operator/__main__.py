"""`python -m registry_operator` (or `berth-operator`): run the Berth operator."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import sys
from collections.abc import Sequence

import kopf

from registry_operator import (
    access,
    credentials,
    fetching,
    granting,
    handlers,
    kopf_toggles,
    reconcile,
    settings,
)
from registry_operator.handlers import runtime
from registry_operator.kube import client as kube_client
from registry_operator.rendering import policy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="berth-operator", description=__doc__)
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="run without peering (development and tests): nothing stops a second replica",
    )
    parser.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    parser.add_argument(
        "--peering", default=env("BERTH_PEERING", "berth"), help="peering object name"
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; default: random, so that exactly one replica is active",
    )
    parser.add_argument(
        "--liveness",
        default=env("BERTH_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL; empty to disable",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(env("BERTH_RESYNC_SECONDS", "300")),
        help="how often every Registry is reconciled even without events",
    )
    parser.add_argument(
        "--registry-image",
        default=env("BERTH_REGISTRY_IMAGE") or None,
        help="server image for Registries that set no spec.image",
    )
    parser.add_argument(
        "--replication-poll-seconds",
        type=float,
        default=float(env("BERTH_REPLICATION_POLL_SECONDS", "15")),
        help=(
            "how often the replication status of Registries with peers, and the readiness"
            " of those on S3 or PostgreSQL, is read"
        ),
    )
    parser.add_argument(
        "--credential-propagation-seconds",
        type=float,
        default=float(env("BERTH_CREDENTIAL_PROPAGATION_SECONDS", "120")),
        help=(
            "during a rotation, how long to wait before handing out a new credential when "
            "the registry server cannot be asked whether it has it"
        ),
    )
    parser.add_argument(
        "--endpoint-overrides",
        default=env("BERTH_ENDPOINT_OVERRIDES") or None,
        help=(
            'JSON file mapping "namespace/name" of a Registry to the URL the operator '
            "reaches its server at (default: the Service's cluster DNS name)"
        ),
    )
    parser.add_argument(
        "--policy-shard-kib",
        type=int,
        default=int(env("BERTH_POLICY_SHARD_KIB", str(policy.SHARD_BYTES // 1024))),
        help=(
            "the compressed size (KiB) a shard of a registry's policy may reach before the "
            "policy is split into more shards; a Secret holds at most 1024"
        ),
    )
    parser.add_argument(
        "--log-format",
        choices=["full", "plain", "json"],
        default=env("BERTH_OPERATOR_LOG_FORMAT", "full"),
        help="log lines as text with timestamps (full), bare text (plain) or JSON",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if not 1 <= args.policy_shard_kib <= 768:
        parser.error("--policy-shard-kib must be between 1 and 768 (a Secret holds 1 MiB)")
    if args.namespaces and not args.standalone:
        # Namespaced Kopf peering needs a KopfPeering CRD that Berth does not ship.
        parser.error("--namespace needs --standalone (peering is cluster-wide only)")
    return args


M_ARENA_MAX = -8  # glibc's mallopt parameter


def fewer_malloc_arenas(arenas: int = 2) -> bool:
    """glibc gives threads that allocate at once arenas of their own (up to 8 per core);
    the API calls run in worker threads, and the memory they free is then spread over
    many arenas the process keeps. Two arenas keep the RSS near what is in use (see
    docs/operator.md, "Scale"). Done before any thread starts; False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): an access
    pass over thousands of Repositories frees most of what it allocated, and glibc
    keeps it otherwise. Nothing where not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fewer_malloc_arenas()
    kopf_toggles.install()
    # Kopf's formatter prefixes each object's messages with [namespace/name].
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat[args.log_format.upper()],
        log_prefix=True,
    )
    if not args.verbose:
        settings.quiet_event_handlers()
    registry = kopf.OperatorRegistry()
    handlers.register(
        registry,
        resync_seconds=args.resync_seconds,
        replication_poll_seconds=args.replication_poll_seconds,
    )
    kube = kube_client.Client.connect()
    state = runtime.Runtime(
        kube=kube,
        peering=None if args.standalone else args.peering,
        options=reconcile.Options(image=args.registry_image, generators=credentials.Generators()),
        endpoints=fetching.Endpoints(args.endpoint_overrides),
        namespaces_watched=tuple(args.namespaces),
        trim_heap=trim_heap,
    )
    state.access_options = granting.Options(
        settings=access.Settings(propagation=args.credential_propagation_seconds),
        prober=state.probe,
        usage=state.usage_of,
        policy_shard_bytes=args.policy_shard_kib * 1024,
    )
    memo = kopf.Memo(berth=state)
    # Equal priorities make every replica pause, so each replica draws its own.
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    try:
        kopf.run(
            registry=registry,
            settings=settings.build(settings.Options(peering_name=args.peering)),
            standalone=args.standalone,
            peering_name=None if args.standalone else args.peering,
            priority=priority,
            clusterwide=not args.namespaces,
            namespaces=args.namespaces,
            liveness_endpoint=args.liveness or None,
            memo=memo,
        )
    finally:
        kube.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
