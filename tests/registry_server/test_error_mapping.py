"""Storage errors that reach the HTTP layer answer in the spec's format, never 500."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from registry_server.http.errors import error_middleware
from registry_server.storage.driver import StorageConflict, StorageFull


async def _answer(exc: Exception) -> tuple[int, dict[str, object], dict[str, str]]:
    async def handler(request: web.Request) -> web.Response:
        raise exc

    app = web.Application(middlewares=[error_middleware])
    app.router.add_route("PATCH", "/v2/r/blobs/uploads/u", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.patch("/v2/r/blobs/uploads/u", data=b"x")
        return response.status, await response.json(), dict(response.headers)


async def test_a_lost_race_on_an_upload_is_416_blob_upload_invalid() -> None:
    status, body, _ = await _answer(StorageConflict("uploads/u/data"))
    assert status == 416
    assert body["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"  # type: ignore[index]


async def test_a_full_volume_is_507_with_retry_after() -> None:
    status, body, headers = await _answer(StorageFull("no space"))
    assert status == 507 and "Retry-After" in headers
    assert body["errors"][0]["code"] == "UNKNOWN"  # type: ignore[index]
