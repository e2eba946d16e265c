"""Byte counts as people write and read them (pure): Kubernetes-style quantities in,
binary units out."""

from __future__ import annotations

import re

_QUANTITY = re.compile(r"(?P<number>[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_FACTORS = {
    None: 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip


class QuantityError(ValueError):
    pass


def parse_bytes(value: object) -> int:
    """A byte count from an integer or a Kubernetes-style quantity (``10Gi``, ``500M``)."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise QuantityError(f"{value!r} is not a size (negative)")
        return value
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value.strip())
        if match:
            return int(match["number"]) * _FACTORS[match["suffix"]]
    raise QuantityError(f"{str(value)[:60]!r} is not a size such as 10Gi, 500Mi or 2000000000")


def format_bytes(size: int) -> str:
    """A size as people read it (binary units, one decimal)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
