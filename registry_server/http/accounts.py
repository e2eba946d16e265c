"""Which credential the server holds for an account, for admins.

The operator rotates a robot's secret by adding the new one to the policy and handing it
out only once the server has reloaded the policy. It asks here, with its admin account,
instead of trying the new secret: a login attempt before the reload would be a failed
login, counted by the limiter against the account and the operator's address.
The answer is a digest of the stored bcrypt hash (``null`` for an unknown account),
never the hash; the operator compares it with the digest of the hash it wrote.
"""

from __future__ import annotations

import json

from aiohttp import web

from registry_server.auth.model import ACCOUNTS, CredentialSource
from registry_server.http.context import client_address, services
from registry_server.http.errors import API_VERSION_HEADER

PATH = "/berth/v1/auth/credentials"


async def credential(request: web.Request) -> web.Response:
    auth = services(request).auth
    await auth.authorize(request.headers.get("Authorization"), client_address(request), [ACCOUNTS])
    name = request.rel_url.query.get("account", "")
    fingerprint = auth.credential_fingerprint(name) if isinstance(auth, CredentialSource) else None
    return web.Response(
        body=json.dumps({"account": name, "fingerprint": fingerprint}).encode(),
        content_type="application/json",
        headers=API_VERSION_HEADER,
    )


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", PATH, credential)
