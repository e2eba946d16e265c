"""The command line and the Kopf settings it runs with."""

from __future__ import annotations

import logging

import kopf
import pytest

from registry_operator import __main__ as cli
from registry_operator import settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("BERTH_PEERING", "BERTH_OPERATOR_LIVENESS", "BERTH_RESYNC_SECONDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("BERTH_REGISTRY_IMAGE", raising=False)
    args = cli.parse_args([])
    assert not args.standalone
    assert args.namespaces == []
    assert args.peering == "berth"
    assert args.priority is None
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.resync_seconds == 300
    assert args.registry_image is None
    assert args.policy_shard_kib == 384


def test_policy_shard_size(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BERTH_POLICY_SHARD_KIB", "64")
    assert cli.parse_args([]).policy_shard_kib == 64
    assert cli.parse_args(["--policy-shard-kib", "16"]).policy_shard_kib == 16
    with pytest.raises(SystemExit):
        cli.parse_args(["--policy-shard-kib", "1024"])
    assert "a Secret holds 1 MiB" in capsys.readouterr().err


def test_fewer_malloc_arenas_is_harmless() -> None:
    assert isinstance(cli.fewer_malloc_arenas(), bool)


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_REGISTRY_IMAGE", "mirror.example.com/berth:1")
    monkeypatch.setenv("BERTH_RESYNC_SECONDS", "60")
    args = cli.parse_args(
        ["--standalone", "--namespace", "a", "--namespace", "b", "--liveness", ""]
    )
    assert args.registry_image == "mirror.example.com/berth:1"
    assert args.resync_seconds == 60
    assert args.namespaces == ["a", "b"]
    assert args.liveness == ""


def test_namespaces_need_standalone(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--namespace", "a"])
    assert "--namespace needs --standalone" in capsys.readouterr().err


def test_settings() -> None:
    built = settings.build()
    assert built.persistence.finalizer == "berth.dev/finalizer"
    assert isinstance(built.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(built.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    # The API server wants whole seconds in timeoutSeconds.
    assert built.watching.server_timeout == 300
    assert isinstance(built.watching.server_timeout, int)
    assert built.watching.client_timeout == 330
    assert built.peering.name == "berth"
    assert built.posting.level == logging.WARNING
    # A few event posters, not one connection per object posted about (issue 18).
    assert built.posting.worker_limit == settings.POSTING_WORKERS
    # Kopf watches no children: the operator watches their metadata itself (issue 18).
    assert not dict(built.watching.label_selectors.items())


def test_the_per_event_success_lines_are_dropped() -> None:
    logger = logging.getLogger("test.quiet")
    settings.quiet_event_handlers(logger)
    records = []
    for message in (
        "Handler 'node-claims' succeeded.",
        "Handler 'namespace' succeeded.",
        "Handler 'reconcile-update' succeeded.",
        "Handler 'repository' failed with an exception. Will retry.",
    ):
        record = logger.makeRecord("test.quiet", logging.INFO, __file__, 1, message, (), None)
        records.append((message, logger.filter(record)))
    assert [m for m, kept in records if kept] == [
        "Handler 'reconcile-update' succeeded.",
        "Handler 'repository' failed with an exception. Will retry.",
    ]
