"""HTTPS on the registry's listener: the server's SSLContext and its certificate reloads.

The certificate and key are usually a mounted Secret, which the kubelet (or cert-manager's
CSI driver) replaces by swapping the ``..data`` symlink. Each worker polls the files'
identity (resolved target, inode, size, mtime) like the auth files; a change seen
unchanged by two polls is read, checked on a scratch context (the key matches, the
certificate is not expired), and only then put in force: a fresh context is made for it,
and the listener's context hands each new connection to the context in force as its
ClientHello arrives (``sni_callback``, which OpenSSL calls with or without SNI).
Connections accepted after that present the new certificate, those already open keep
theirs, so no request fails. A pair that does not pass is logged and the last good one
stays in force.

Loading the new pair into the live context instead would keep the old one beside it
whenever the key type changed (OpenSSL holds one certificate per key type, EC and RSA),
and clients would go on being shown the old certificate and its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from prometheus_client import Counter, Gauge

from registry_server.config import TlsConfig
from registry_server.storage.tasks import cancel_and_wait

log = logging.getLogger("registry_server.tls")

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3's are all of that kind).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"

RELOADS = Counter(
    "berth_tls_reloads_total", "Serving certificate reloads by result (ok, error)", ["result"]
)
NOT_AFTER = Gauge(
    "berth_tls_certificate_not_after_seconds",
    "Expiry of the serving certificate in force (Unix time)",
)


class CertificateError(Exception):
    """A certificate/key pair that cannot serve; the message says why."""


@dataclass(frozen=True)
class Pair:
    """A certificate chain and its key as read, with what was checked about them."""

    cert_pem: bytes
    key_pem: bytes
    subject: str
    not_after: datetime.datetime


Identity = tuple[tuple[str, int, int, int, int] | None, ...]


def _identity(*paths: Path) -> Identity:
    """What tells a change of the files: each one's resolved target and stat figures."""
    out: list[tuple[str, int, int, int, int] | None] = []
    for path in paths:
        try:
            target = os.path.realpath(path)
            st = os.stat(target)
        except OSError:
            out.append(None)
            continue
        out.append((target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@contextlib.contextmanager
def _as_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths holding ``contents`` for ``load_cert_chain``, which reads files only: memory
    files where the system has them, so a pair checked is exactly the pair loaded and the
    key is not written to a disk."""
    fds: list[int] = []
    scratch: tempfile.TemporaryDirectory[str] | None = None
    try:
        paths = []
        for i, data in enumerate(contents):
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("berth-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                path = f"/proc/self/fd/{fd}"
            else:  # pragma: no cover - not Linux
                scratch = scratch or tempfile.TemporaryDirectory(prefix="berth-tls-")
                path = os.path.join(scratch.name, str(i))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                fds.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            paths.append(path)
        yield paths
    finally:
        for fd in fds:
            os.close(fd)
        if scratch is not None:  # pragma: no cover - not Linux
            scratch.cleanup()


def _load(context: ssl.SSLContext, pair: Pair) -> None:
    with _as_files(pair.cert_pem, pair.key_pem) as (cert, key):
        context.load_cert_chain(cert, key)


def read_pair(cfg: TlsConfig) -> Pair:
    """Read and check the configured pair (blocking: files, key parsing)."""
    try:
        cert_pem = cfg.certificate.read_bytes()
        key_pem = cfg.key.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read the certificate or key: {exc}") from None
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"{cfg.certificate}: not a PEM certificate: {exc}") from None
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            f"{cfg.certificate}: expired at {leaf.not_valid_after_utc.isoformat()}"
        )
    pair = Pair(cert_pem, key_pem, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc)
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        _load(scratch, pair)
    except ssl.SSLError as exc:
        # OpenSSL's reason: a key that does not match, a malformed key, an empty chain.
        raise CertificateError(
            f"{cfg.certificate}, {cfg.key}: refused by OpenSSL: {exc.reason or exc}"
        ) from None
    return pair


def server_context(cfg: TlsConfig, pair: Pair) -> ssl.SSLContext:
    """The listener's context: TLS 1.2+ (or 1.3 only), AEAD suites, HTTP/1.1 by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    # aiohttp speaks HTTP/1.1 only: clients offering h2 are told so in the handshake.
    context.set_alpn_protocols(["http/1.1"])
    if cfg.client_ca is not None:
        context.load_verify_locations(cafile=str(cfg.client_ca))
        context.verify_mode = (
            ssl.CERT_REQUIRED if cfg.client_auth == "require" else ssl.CERT_OPTIONAL
        )
    _load(context, pair)
    return context


class ServingTls:
    """The live context of one worker process and the watch that reloads its pair."""

    def __init__(self, cfg: TlsConfig) -> None:
        self.cfg = cfg
        self._paths = (cfg.certificate, cfg.key)
        before = _identity(*self._paths)
        try:
            pair = read_pair(cfg)
        except CertificateError as exc:
            raise CertificateError(f"http.tls: {exc}") from None
        # The listener's context; ``_current`` the one connections are handed to.
        self.context = server_context(cfg, pair)
        self._current = self.context
        self.context.sni_callback = self._hand_over
        self.pair = pair
        self._seen = _identity(*self._paths)
        self._loaded = self._seen if self._seen == before else None
        self._task: asyncio.Task[None] | None = None
        NOT_AFTER.set(pair.not_after.timestamp())

    def check(self) -> Pair | None:
        """A new, good pair when the files changed and settled (blocking: run in a thread).
        A bad one is logged once and None returned."""
        now = _identity(*self._paths)
        settled = now == self._seen
        self._seen = now
        if now == self._loaded or not settled:
            return None
        try:
            pair = read_pair(self.cfg)
        except CertificateError as exc:
            self._loaded = now  # reported once, not on every poll
            log.error(
                "new TLS certificate refused; keeping the one in force",
                extra={"error": str(exc), "in_force": self.pair.subject},
            )
            RELOADS.labels("error").inc()
            return None
        # Files that moved while being read may be a mix of two pairs: read again then.
        self._loaded = now if _identity(*self._paths) == now else None
        return pair

    def _hand_over(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        current = self._current
        if current is not context:
            connection.context = current

    def apply(self, pair: Pair) -> None:
        """Put ``pair`` in force for the connections accepted from now on."""
        try:
            fresh = server_context(self.cfg, pair)
        except (ssl.SSLError, OSError) as exc:  # it passed on a scratch context
            log.error("TLS certificate could not be loaded", extra={"error": str(exc)})
            RELOADS.labels("error").inc()
            return
        self._current = fresh
        self.pair = pair
        NOT_AFTER.set(pair.not_after.timestamp())
        RELOADS.labels("ok").inc()
        log.info(
            "TLS certificate reloaded",
            extra={"subject": pair.subject, "not_after": pair.not_after.isoformat()},
        )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_seconds)
            started = time.monotonic()
            try:
                pair = await asyncio.to_thread(self.check)
                if pair is not None:
                    self.apply(pair)
            except Exception:
                log.exception("TLS certificate watcher failed; will retry")
            elapsed = time.monotonic() - started
            if elapsed > self.cfg.reload_interval_seconds:
                log.warning("TLS certificate poll is slow", extra={"seconds": round(elapsed, 3)})

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="berth-tls-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])
