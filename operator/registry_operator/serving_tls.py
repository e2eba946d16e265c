"""What `spec.tls` asks of one reconcile (pure: Secret data and a clock in, a plan out).

- Generated: keep the Registry's CA (`<name>-serving-ca`) and serving certificate
  (`<name>-serving-tls`) while they are sound, make them when missing, issue the
  serving certificate again when it nears expiry, lacks a Service name, or the CA no
  longer signed it. The server reloads the new files without a restart.
- Secret: a user's Secret (cert-manager's keys); the operator only reads it, to trust
  its ca.crt and to report its expiry.
- Disabled: plain HTTP; nothing to plan.
Either way the status reports the certificate's expiry, and a Warning goes out once
when it is within `certificates.WARN_BEFORE`.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from registry_operator import certificates, models
from registry_operator.rendering import manifests, names

CONDITION = "CertificateReady"


@dataclasses.dataclass(frozen=True)
class Plan:
    material: manifests.ServingSecrets | None = None  # Generated: the two Secrets to apply
    ca_pem: str | None = None  # what clients in the cluster trust; None: plain HTTP or unknown
    report: Mapping[str, Any] | None = None  # status.tls
    condition: tuple[str, str, str] | None = None  # CONDITION's (status, reason, message)
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)


def subject(owner: models.Owner) -> str:
    return f"Berth registry {owner.namespace}/{owner.name} CA"


def plan(
    spec: models.Spec,
    owner: models.Owner,
    ca_data: Mapping[str, str] | None,
    serving_data: Mapping[str, str] | None,
    now: datetime.datetime,
    cluster_domain: str = "cluster.local",
) -> Plan:
    """`ca_data` and `serving_data`: the decoded data of the CA Secret and of the serving
    Secret (Generated: ours; Secret: the user's), None when missing."""
    mode = spec.tls.mode
    if mode == models.TLS_DISABLED:
        return Plan()
    wanted = certificates.serving_names(names.service(owner.name), owner.namespace, cluster_domain)
    if mode == models.TLS_SECRET:
        return _users(spec, owner, serving_data, wanted, now)
    return _generated(owner, ca_data, serving_data, wanted, now)


def _generated(
    owner: models.Owner,
    ca_data: Mapping[str, str] | None,
    serving_data: Mapping[str, str] | None,
    wanted: certificates.Names,
    now: datetime.datetime,
) -> Plan:
    events: list[tuple[str, str, str]] = []
    ca_secret, serving_secret = (
        names.serving_ca_secret(owner.name),
        names.serving_secret(owner.name),
    )
    ca_data = ca_data or {}
    authority = certificates.Authority(
        ca_data.get(certificates.CA_KEY, ""), ca_data.get(certificates.CA_PRIVATE_KEY, "")
    )
    why = certificates.authority_problem(authority, now) if ca_data else "missing"
    if why is not None:
        authority = certificates.new_authority(subject(owner), now)
        if ca_data:
            # Clients trusting the old CA (peers, node proxies) follow at their next sync.
            message = f"replaced the CA in Secret {ca_secret} ({why}); peers trust the new one"
            events.append(("Warning", "CertificateAuthorityReplaced", message))
    data = serving_data or {}
    serving = certificates.Serving(
        data.get(certificates.CERT_KEY, ""),
        data.get(certificates.KEY_KEY, ""),
        data.get(certificates.CA_KEY, ""),
    )
    if serving.ca_pem != authority.cert_pem:
        reason: str | None = f"{certificates.CA_KEY} is not the Registry's CA"
    else:
        reason = certificates.serving_problem(serving, wanted, now)
    if not serving_data:
        reason = "missing"
    if reason is not None:
        serving = certificates.issue(authority, wanted, now)
        expires = certificates.rfc3339(certificates.not_after(serving.cert_pem))
        message = (
            f"issued the serving certificate in Secret {serving_secret}, valid until {expires}"
        )
        if serving_data:
            message += f" (the old one: {reason})"
        events.append(("Normal", "CertificateIssued", message))
    material = manifests.ServingSecrets(
        authority.cert_pem, authority.key_pem, serving.cert_pem, serving.key_pem
    )
    expiry = certificates.not_after(serving.cert_pem)
    report, condition = _report(models.TLS_GENERATED, serving_secret, expiry, now)
    return Plan(material, authority.cert_pem, report, condition, tuple(events))


def _users(
    spec: models.Spec,
    owner: models.Owner,
    data: Mapping[str, str] | None,
    wanted: certificates.Names,
    now: datetime.datetime,
) -> Plan:
    secret = spec.tls.secret_name
    assert secret is not None
    report: dict[str, Any] = {"mode": models.TLS_SECRET, "secretName": secret}
    if data is None:
        message = f"Secret {secret} does not exist; the server's pods wait for it"
        return Plan(None, None, report, ("False", "SecretMissing", message))
    missing = [
        key
        for key in (certificates.CERT_KEY, certificates.KEY_KEY, certificates.CA_KEY)
        if not data.get(key)
    ]
    if missing:
        message = f"Secret {secret} lacks {', '.join(missing)} (cert-manager's keys)"
        return Plan(
            None, data.get(certificates.CA_KEY) or None, report, ("False", "SecretInvalid", message)
        )
    serving = certificates.Serving(
        data[certificates.CERT_KEY], data[certificates.KEY_KEY], data[certificates.CA_KEY]
    )
    # Only what makes clients refuse it: the user's issuer renews on its own schedule.
    problem = certificates.serving_problem(serving, wanted, now, renew_before=datetime.timedelta(0))
    if problem is not None:
        message = f"Secret {secret}: {problem}"
        return Plan(None, serving.ca_pem, report, ("False", "SecretInvalid", message))
    report, condition = _report(
        models.TLS_SECRET, secret, certificates.not_after(serving.cert_pem), now
    )
    return Plan(None, serving.ca_pem, report, condition)


def _report(
    mode: str, secret: str, expiry: datetime.datetime, now: datetime.datetime
) -> tuple[dict[str, Any], tuple[str, str, str]]:
    report: dict[str, Any] = {
        "mode": mode,
        "secretName": secret,
        "notAfter": certificates.rfc3339(expiry),
    }
    if expiry - now < certificates.WARN_BEFORE:
        days = max(0, (expiry - now).days)
        message = (
            f"the serving certificate in Secret {secret} expires in {days} days,"
            f" at {report['notAfter']}"
        )
        return report, ("True", "ExpiresSoon", message)
    return report, ("True", "Valid", f"valid until {report['notAfter']}")
