"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from registry_server.http.context import Handler, services
from registry_server.http.errors import error_middleware

log = logging.getLogger("registry_server.health")

REQUESTS = Counter("berth_http_requests_total", "HTTP requests served", ["method", "status"])
LATENCY = Histogram("berth_http_request_seconds", "HTTP request latency", ["method"])
# Label values come from this set only: a client inventing methods must not grow the series.
# Both back ends are asked at once, within the kubelet's probe timeout (2 s in the
# operator's pod template).
PROBE_TIMEOUT = 1.5
_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        method = request.method if request.method in _METHODS else "other"
        REQUESTS.labels(method, str(status)).inc()
        LATENCY.labels(method).observe(time.perf_counter() - start)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


_draining = False


def begin_drain() -> None:
    """From now on /readyz says 503 (SIGTERM with ``http.drain_seconds``): the Service
    stops sending new connections while this process still serves them."""
    global _draining
    _draining = True


def draining() -> bool:
    return _draining


async def readyz(request: web.Request) -> web.Response:
    """Ready when both back ends answer: the metadata index and the blob store (with
    PostgreSQL and S3, a replica that cannot reach either leaves the Service)."""
    if _draining:
        return web.Response(status=503, text="shutting down\n")
    svc = services(request)
    failures = await asyncio.gather(
        _failure("index", svc.index.ping), _failure("blob store", svc.blobs.store.ping)
    )
    failure = next((f for f in failures if f[0]), ("", ""))
    _report(*failure)
    if failure[0]:
        # The answer names the back end and the error's type only (anyone may ask);
        # the log, once per change, has the error itself.
        return web.Response(status=503, text=f"{failure[0]}\n")
    return web.Response(text="ok\n")


async def _failure(what: str, ping: Callable[[], Awaitable[None]]) -> tuple[str, str]:
    """(why `ping` failed or timed out, the error's text); ("", "") when it answered."""
    try:
        await asyncio.wait_for(ping(), PROBE_TIMEOUT)
    except Exception as exc:  # any failure means not ready; say which and why
        if isinstance(exc, TimeoutError):
            return f"{what} unavailable: Timeout", f"no answer within {PROBE_TIMEOUT} s"
        return f"{what} unavailable: {type(exc).__name__}", str(exc)[:500]
    return "", ""


_last_failure = ""


def _report(failure: str, detail: str) -> None:
    """Log readiness when it changes (the kubelet asks every few seconds)."""
    global _last_failure
    if failure == _last_failure:
        return
    if failure:
        log.warning("not ready", extra={"cause": failure, "error": detail})
    else:
        log.info("ready again", extra={"was": _last_failure})
    _last_failure = failure


async def readyz_writes(request: web.Request) -> web.Response:
    """Ready for pushes: the index answers and the volume is not full. (``/readyz`` stays
    ready on a full volume: pulls and deletes still work.)"""
    not_ready = await readyz(request)
    if not_ready.status != 200:
        return not_ready
    space = services(request).space
    if space.full:
        return web.Response(status=503, text=f"{space.describe()}\n")
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app() -> web.Application:
    """The listener of ``http.metrics_addr``: ``/metrics`` and nothing else, so that what
    routes the registry's port to the world (an Ingress) never exposes it."""
    app = web.Application(middlewares=[error_middleware])
    app.router.add_route("GET", "/metrics", metrics)
    return app
