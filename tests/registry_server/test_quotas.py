"""Quota arithmetic (protocol/quotas.py) and sizes (protocol/sizes.py); enforcement is in
the index suite."""

from __future__ import annotations

import pytest

from registry_server.protocol.quotas import NO_QUOTA, Quota, Usage, combine
from registry_server.protocol.sizes import QuantityError, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("given", "expected"),
    [(0, 0), (1234, 1234), ("10Gi", 10 * 2**30), ("500Mi", 500 * 2**20), ("2G", 2 * 10**9),
     ("7", 7), ("1Ki", 1024), (" 3k ", 3000)],
)  # fmt: skip
def test_sizes_as_kubernetes_quantities(given: object, expected: int) -> None:
    assert parse_bytes(given) == expected


@pytest.mark.parametrize("given", [-1, True, "10GB", "1.5Gi", "", "Gi", "1e9", None, 2.5, "10gi"])
def test_what_is_not_a_size(given: object) -> None:
    with pytest.raises(QuantityError):
        parse_bytes(given)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(10 * 2**30) == "10.0 GiB"


def test_every_matching_quota_holds() -> None:
    assert combine([]) == NO_QUOTA
    assert combine([Quota(storage=10), Quota(tags=5), Quota(storage=7, tags=9)]) == Quota(7, 5)


def test_only_growth_past_a_limit_is_refused() -> None:
    quota = Quota(storage=100, tags=2)
    at = Usage("r", 90, 2, 1)
    assert quota.exceeded_by(at, Usage("r", 100, 2, 2)) is None  # exactly at the limit
    assert "storage quota exceeded" in str(quota.exceeded_by(at, Usage("r", 101, 2, 2)))
    assert "tag quota exceeded" in str(quota.exceeded_by(at, Usage("r", 95, 3, 2)))
    over = Usage("r", 500, 9, 3)  # the quota was lowered after the pushes
    assert quota.exceeded_by(over, Usage("r", 500, 9, 3)) is None
    assert quota.exceeded_by(over, Usage("r", 400, 8, 2)) is None
    assert quota.exceeded_by(over, Usage("r", 501, 9, 3)) is not None
    assert quota.full(Usage("r", 99, 0, 0)) is None
    assert "delete tags or manifests" in str(quota.full(Usage("r", 100, 0, 0)))
    assert NO_QUOTA.full(over) is None and NO_QUOTA.exceeded_by(at, over) is None
