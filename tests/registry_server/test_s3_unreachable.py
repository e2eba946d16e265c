"""An object store that cannot be reached: every driver call, listings included, raises
BackendUnavailable (which the API answers with 503), never botocore's own errors (a 500
with a traceback). Nothing listens on the endpoint, so no store is needed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiobotocore.config import AioConfig

from registry_server.storage.driver import BackendUnavailable
from registry_server.storage.s3 import S3Driver
from tests.support.processes import free_port


@pytest.fixture
async def unreachable() -> AsyncIterator[S3Driver]:
    driver = S3Driver(
        bucket="blobs",
        endpoint=f"http://127.0.0.1:{free_port()}",
        access_key="key",
        secret_key="secret",
    )
    # One attempt: the standard retry mode would back off for seconds per call.
    args = driver._client_args
    args["config"] = args["config"].merge(AioConfig(retries={"max_attempts": 1}))
    try:
        yield driver
    finally:
        await driver.close()


CALLS: dict[str, Callable[[S3Driver], Awaitable[object]]] = {
    "stat": lambda d: d.stat("blobs/sha256/ab/x/data"),
    "get_content": lambda d: d.get_content("uploads/u/info"),
    "list": lambda d: d.list("blobs/sha256"),  # a listing: pages fetched as iterated
    "delete": lambda d: d.delete("uploads/u"),  # lists the keys under the path first
    "purge_incomplete": lambda d: d.purge_incomplete(0.0),  # lists multipart uploads
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_every_call_says_the_store_is_unavailable(
    unreachable: S3Driver, call: Callable[[S3Driver], Awaitable[object]]
) -> None:
    with pytest.raises(BackendUnavailable, match="object store"):
        await call(unreachable)
