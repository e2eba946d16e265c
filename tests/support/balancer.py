"""nginx as a round-robin HTTP load balancer in front of several registry replicas.

nginx picks the upstream per request, not per connection, so the requests of one
client flow (POST, PATCH, PUT of an upload; HEAD then GET of a pull) land on different
replicas even over one keep-alive connection: what a Service with several pods and a
Layer-7 Ingress does, and the hardest case for state shared between replicas. Bodies
stream both ways (no buffering), so large uploads and pulls are not held by nginx.

With `tls` (a certificate and key file: the replicas' own serving pair) it listens with
HTTPS and speaks HTTPS to the replicas too, as an Ingress re-encrypting to HTTPS
backends does; clients verify it exactly as they would verify a replica.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from .processes import ManagedProcess, free_port, http_status, wait_until
from .tools import require_tool


class Balancer:
    """nginx on a free loopback port, round-robin over `upstreams` (host:port)."""

    def __init__(
        self,
        workdir: Path,
        upstreams: Sequence[str],
        tls: tuple[Path, Path] | None = None,
        context: ssl.SSLContext | None = None,
        port: int = 0,
    ) -> None:
        """`context`: how this test process verifies the balancer's HTTPS (with `tls`);
        `port`: one chosen beforehand (0: a free one at start), for replicas that must
        name the balancer before it starts (a peer region's)."""
        self.workdir = workdir
        self.upstreams = list(upstreams)
        self.tls = tls
        self.context = context
        self.port = port
        self.process: ManagedProcess | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> Balancer:
        binary = require_tool("nginx")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self._write_config()
        self.process = ManagedProcess(
            "nginx-balancer",
            [
                binary,
                "-p",
                self.workdir,
                "-c",
                self.workdir / "nginx.conf",
                "-e",
                self.workdir / "error.log",
            ],
            self.workdir / "nginx.log",
        )
        self.process.start()
        wait_until(
            lambda: http_status(f"{self.url}/v2/", context=self.context) in (200, 401),
            timeout=30,
            what="nginx balancer answering /v2/",
            process=self.process,
        )
        return self

    def _write_config(self) -> None:
        home = self.workdir
        user = "user root;\n" if os.geteuid() == 0 else ""
        servers = "\n".join(
            # A replica that fails a connection is left out for a second, then tried again.
            f"    server {upstream} max_fails=1 fail_timeout=1s;"
            for upstream in self.upstreams
        )
        temp = "\n".join(
            f"  {kind}_temp_path {home}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        tls = ""
        if self.tls is not None:
            cert, key = self.tls
            tls = (
                f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
                "    ssl_protocols TLSv1.2 TLSv1.3;\n"
                # Upstream keep-alive over TLS: sessions are reused, not renegotiated.
                "    proxy_ssl_session_reuse on;"
            )
        (home / "nginx.conf").write_text(
            f"""daemon off;
{user}worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format upstreams '$upstream_addr $request_method $status';
  access_log {home}/access.log upstreams;
{temp}
  upstream replicas {{
{servers}
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{self.port}{" ssl" if self.tls else ""};
{tls}
    client_max_body_size 0;
    location / {{
      proxy_pass {"https" if self.tls else "http"}://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # The replicas build absolute URLs (token realm) from the Host the client used.
      proxy_set_header Host $http_host;
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_read_timeout 300s;
      # Only requests that may be repeated go to another replica after a failure
      # (nginx's default): a PATCH or PUT cut by a replica's death fails to the client.
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""
        )

    def requests_per_upstream(self) -> dict[str, int]:
        """How many requests each replica answered, from the access log."""
        counts: dict[str, int] = {}
        log = self.workdir / "access.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            # A retried request lists every replica tried: "a:1, b:2 GET 200".
            for upstream in line.split(" ")[0:-2]:
                address = upstream.rstrip(",")
                counts[address] = counts.get(address, 0) + 1
        return counts

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)


__all__ = ["Balancer"]
