"""Prometheus metrics of the auth package (served by the /metrics endpoint)."""

from __future__ import annotations

from prometheus_client import Counter

FAILURES = Counter(
    "berth_auth_failures_total",
    "Failed authentications (bad credentials, invalid tokens), by reason",
    ["reason"],
)
RATE_LIMITED = Counter(
    "berth_auth_rate_limited_total",
    "Requests refused with 429 because their client failed to authenticate too often",
)
TOKENS_ISSUED = Counter(
    "berth_auth_tokens_issued_total", "Tokens issued by the token endpoint", ["kind"]
)
RELOADS = Counter(
    "berth_auth_reloads_total",
    "Reloads of the htpasswd and policy files, by file and result",
    ["file", "result"],
)
