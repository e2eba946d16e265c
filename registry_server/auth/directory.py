"""Who exists and what each may do: one immutable snapshot (pure: no I/O here).

A Directory joins the htpasswd users with the policy file's users, robots and rules. The
reloader builds a new one whenever a file changes and swaps it in whole, so a request sees
either the old or the new configuration, never a mix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from registry_server.auth import htpasswd, scopes
from registry_server.auth import policy as policy_mod
from registry_server.auth.model import ANONYMOUS, CATALOG, Access, Principal

log = logging.getLogger("registry_server.auth")


@dataclass(frozen=True)
class Directory:
    accounts: Mapping[str, policy_mod.Account]
    policy: policy_mod.Policy
    # Every bcrypt cost the accounts use: a refused login does one check at each
    # (auth.passwords), so that a name's existence does not show in the time taken.
    costs: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        costs = {htpasswd.bcrypt_cost(a.secret_hash) for a in self.accounts.values()}
        object.__setattr__(self, "costs", frozenset(c for c in costs if c is not None))

    @classmethod
    def build(
        cls, htpasswd_users: Mapping[str, str], policy: policy_mod.Policy | None
    ) -> Directory:
        """Accounts from both sources; the policy file's own entries win on a name clash."""
        effective = policy if policy is not None else policy_mod.AUTHENTICATED_FULL_ACCESS
        accounts = {
            name: policy_mod.Account(name, "user", secret)
            for name, secret in htpasswd_users.items()
        }
        for name, account in effective.accounts.items():
            if name in accounts:
                log.warning(
                    "account defined in both htpasswd and the policy file; the policy wins",
                    extra={"account": name},
                )
            accounts[name] = account
        unknown = [n for n in policy_mod.names_in(effective) if n not in accounts]
        if unknown:
            log.warning("policy names accounts that do not exist", extra={"accounts": unknown})
        return cls(accounts, effective)

    def principal(self, name: str | None) -> Principal:
        if name is None:
            return ANONYMOUS
        if name in self.policy.admins:
            return Principal(name, "admin")
        account = self.accounts.get(name)
        return Principal(name, account.kind if account is not None else "user")

    def permits(self, name: str | None, access: Access) -> bool:
        """Whether ``name`` (None: anonymous) has every action of ``access``."""
        if scopes.is_catalog(access):
            return self.policy.catalog(name)
        if scopes.admin_only(access) is not None:
            return self.policy.administers(name)
        if access.type != scopes.REPOSITORY:
            return False
        return access.actions <= self.policy.actions(name, access.name)

    def grant(self, name: str | None, requested: Sequence[Access]) -> list[Access]:
        """The part of each requested scope that policy allows; nothing is ever added."""
        granted: list[Access] = []
        for access in requested:
            if scopes.is_catalog(access):
                if self.policy.catalog(name):
                    granted.append(CATALOG)
            elif (resource := scopes.admin_only(access)) is not None:
                if self.policy.administers(name):
                    granted.append(resource)
            elif access.type == scopes.REPOSITORY and scopes.valid_repository(access.name):
                wanted = scopes.requested_repository_actions(access)
                allowed = wanted & self.policy.actions(name, access.name)
                if allowed:
                    granted.append(Access(scopes.REPOSITORY, access.name, allowed))
        return scopes.merge(granted)
