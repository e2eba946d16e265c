"""/metrics on a listener of its own (`http.metrics_addr`): a real berth process.

What routes the registry's port to the world (the Ingress the operator renders) must not
expose the metrics; with `metrics_addr` set the registry's port answers 404 there, and
the metrics port serves nothing but /metrics. Without it, /metrics stays on the main port.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.clients import Registry
from tests.support.processes import RegistryProcess, free_port

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_only_on_their_own_port(registry_process: Start, workers: int) -> None:
    metrics_port = free_port()
    process = registry_process(
        "berth",
        config={"http": {"workers": workers, "metrics_addr": f"127.0.0.1:{metrics_port}"}},
    )
    api, metrics = Registry(process.url), Registry(f"http://127.0.0.1:{metrics_port}")
    assert api.get("/v2/").status == 200
    refused = api.get("/metrics")
    assert refused.status == 404
    assert refused.json()["errors"][0]["code"] == "UNSUPPORTED"
    scraped = metrics.get("/metrics")
    assert scraped.status == 200
    assert (scraped.header("Content-Type") or "").startswith("text/plain")
    assert b"berth_http_requests_total" in scraped.body
    # Nothing of the registry on the metrics port.
    assert metrics.get("/v2/").status == 404
    assert metrics.get("/healthz").status == 404
    assert "metrics_addr" in process.log_tail(50)


def test_without_metrics_addr_metrics_stay_on_the_main_port(registry_process: Start) -> None:
    api = Registry(registry_process("berth").url)
    scraped = api.get("/metrics")
    assert scraped.status == 200 and b"berth_http_requests_total" in scraped.body
