"""Running the application on a listening socket, with the spec's errors at every level.

aiohttp answers requests its HTTP parser refuses (bad characters in the request line, an
unknown method, a malformed header) itself, in plain text, before any middleware runs.
The connection handler here renders those, and anything else that escapes the
middlewares, through ``http.errors`` like every other error. ``run`` is ``web.run_app``
for one pre-bound socket, with that handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from collections.abc import Sequence

from aiohttp import http_exceptions, web, web_protocol, web_request, web_server

from registry_server.http import health
from registry_server.http.errors import render
from registry_server.http.tls import ServingTls
from registry_server.protocol import errors

log = logging.getLogger("registry_server.http")


def refusal(status: int, exc: BaseException | None) -> errors.RegistryError:
    """The catalogue's error for what the connection handler was about to answer."""
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return errors.RegistryError(errors.METHOD_UNKNOWN)
    if isinstance(exc, http_exceptions.HttpProcessingError) and status < 500:
        return errors.RegistryError(errors.REQUEST_MALFORMED, detail={"reason": exc.message[:200]})
    if status == 504:
        return errors.RegistryError(errors.TIMEOUT)
    return errors.RegistryError(errors.INTERNAL)


class _Connection(web_protocol.RequestHandler):
    def handle_error(
        self,
        request: web_request.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is under way: only closing is left
            return super().handle_error(request, status, exc, message)
        err = refusal(status, exc)
        if err.status >= 500:
            log.error("request failed", exc_info=exc)
        else:  # any client can send these: one line, no traceback
            log.info("request refused by the HTTP parser", extra={"reason": str(err.detail)})
        response = render(err)
        # The parser's state after a refused request is unknown: no further requests on it.
        response.force_close()
        return response


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections answer every error in the spec's format."""

    async def _make_server(self) -> web_server.Server:
        plain = await super()._make_server()
        return _Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )


async def start(
    app: web.Application,
    sock: socket.socket,
    *,
    handle_signals: bool = False,
    shutdown_timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Runner:
    """Serve ``app`` on ``sock`` (over TLS with ``ssl_context``) until the returned runner
    is cleaned up."""
    runner = Runner(
        app,
        handle_signals=handle_signals,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
        keepalive_timeout=75,  # web.run_app's default (the handler's own is an hour)
    )
    await runner.setup()
    try:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def run(
    app: web.Application,
    sock: socket.socket,
    shutdown_timeout: float,
    extra: Sequence[tuple[web.Application, socket.socket]] = (),
    tls: ServingTls | None = None,
    drain_seconds: float = 0.0,
    early_signals: Sequence[int] = (),
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (as ``web.run_app``).

    ``extra`` are further applications on sockets of their own (the metrics listener),
    started after the main one and stopped before it. With ``tls`` the main socket
    serves HTTPS and its certificate is reloaded when the files change. With
    ``drain_seconds`` a SIGTERM first makes /readyz answer 503 and serving goes on that
    long (new connections too: a Service may still route some here until it has seen
    the pod unready), then the graceful shutdown; a second signal cuts the wait short.
    ``early_signals``: those received before this was called (during start-up).
    """

    async def serve() -> None:
        stop = asyncio.Event()

        def on_signal() -> None:
            if drain_seconds <= 0 or health.draining():
                stop.set()
                return
            log.info("draining before shutdown", extra={"seconds": drain_seconds})
            health.begin_drain()
            asyncio.get_running_loop().call_later(drain_seconds, stop.set)

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        if early_signals:
            on_signal()
        runners = [
            await start(
                app,
                sock,
                shutdown_timeout=shutdown_timeout,
                ssl_context=tls.context if tls is not None else None,
            )
        ]
        if tls is not None:
            await tls.start()
        try:
            for other, other_sock in extra:
                runners.append(await start(other, other_sock, shutdown_timeout=shutdown_timeout))
            await stop.wait()
        finally:
            if tls is not None:
                await tls.stop()
            for runner in reversed(runners):
                await runner.cleanup()

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():  # cancelling it runs the graceful cleanup
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
