"""The access model shared by the HTTP layer and the auth implementations (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from registry_server.protocol.quotas import Quota
from registry_server.protocol.tag_rules import TagRules


@dataclass(frozen=True)
class Access:
    """One resource and the actions wanted on it, as in a token ``scope``."""

    type: str  # "repository" or "registry"
    name: str  # repository name, or "catalog"
    actions: frozenset[str]

    @classmethod
    def repository(cls, name: str, *actions: str) -> Access:
        return cls("repository", name, frozenset(actions))

    def scope(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


CATALOG = Access("registry", "catalog", frozenset({"*"}))
# Replication status and anti-entropy state: for peers and the operator (admins only).
REPLICATION = Access("registry", "replication", frozenset({"*"}))
# Which credential the server holds for an account (the operator's rotation check; admins).
ACCOUNTS = Access("registry", "accounts", frozenset({"*"}))
# /metrics on the registry's own port when auth is on: it names every repository, and
# its failure counters tell which account names exist (not on http.metrics_addr's).
METRICS = Access("registry", "metrics", frozenset({"*"}))
# Resources only admins have, whatever the policy's rules say.
ADMIN_ONLY = (REPLICATION, ACCOUNTS, METRICS)


@dataclass(frozen=True)
class Principal:
    name: str  # "" for anonymous
    kind: str  # "anonymous" | "user" | "robot" | "admin"


ANONYMOUS = Principal("", "anonymous")


class Authorizer(Protocol):
    async def authorize(
        self, authorization: str | None, client: str, wanted: Sequence[Access]
    ) -> Principal:
        """Authenticate the request and check every wanted access.

        Raises RegistryError UNAUTHORIZED (with a WWW-Authenticate header) when the caller
        must (re)authenticate, DENIED when authenticated but not allowed.
        """

    async def allowed(self, principal: Principal, access: Access) -> bool:
        """Whether an already authenticated principal has ``access`` (catalog, mount)."""


class OpenAccess:
    """No authentication configured: everyone may do everything (like registry:2's default)."""

    async def authorize(
        self, authorization: str | None, client: str, wanted: Sequence[Access]
    ) -> Principal:
        return ANONYMOUS

    async def allowed(self, principal: Principal, access: Access) -> bool:
        return True


# --- the token endpoint and the request context (optional parts of an Authorizer) ----------

# "scheme://host[:port]" of the request being served, set by the HTTP layer, so that a
# challenge's realm can point back at this server when no external URL is configured.
REQUEST_ORIGIN: ContextVar[str] = ContextVar("berth_request_origin", default="")


@dataclass(frozen=True)
class TokenRequest:
    """A request to the token endpoint, already taken apart by the HTTP layer."""

    client: str
    scopes: tuple[str, ...] = ()
    service: str | None = None
    authorization: str | None = None  # GET: the Authorization header (Basic or none)
    grant_type: str | None = None  # POST: "password" | "refresh_token"
    username: str | None = None
    password: str | None = None
    refresh_token: str | None = None
    offline: bool = False  # also return a refresh token


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: str  # RFC 3339
    scope: str  # what was granted, in scope syntax
    refresh_token: str | None = None


class TokenError(Exception):
    """The token endpoint refuses a request; rendered as an OAuth2 error body."""

    def __init__(
        self, status: int, error: str, description: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.headers = dict(headers or {})


@runtime_checkable
class TokenIssuer(Protocol):
    async def issue_token(self, request: TokenRequest) -> IssuedToken:
        """Authenticate the request and issue a token for what policy allows of its scopes.

        Raises TokenError (bad request, bad credentials) or RegistryError TOO_MANY_REQUESTS.
        """


@runtime_checkable
class CredentialSource(Protocol):
    """An Authorizer that can say which credential it holds for an account."""

    def credential_fingerprint(self, name: str) -> str | None:
        """A short digest of the account's stored secret hash; None when no such account."""


@runtime_checkable
class Background(Protocol):
    """An Authorizer with work of its own (file watching) around the server's lifetime."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class TagRuleSource(Protocol):
    """An Authorizer whose policy also holds per-repository tag rules (immutable tags,
    retention) and quotas; the manifest, upload and retention services ask it on every
    use, so a policy reload applies at once."""

    def tag_rules(self, repository: str) -> TagRules: ...

    def quota(self, repository: str) -> Quota:
        """The repository's quota (protocol/quotas.py), from the same policy."""


@runtime_checkable
class SessionSource(Protocol):
    """An Authorizer that can log people into the web UI: a session is a signed token
    (the registry's own key) for a distinct audience, tied to the account's current
    secret, so that changing the password or removing the account ends it."""

    async def open_session(self, name: str, secret: str, client: str) -> str:
        """The session's value for a good name and secret; raises UNAUTHORIZED (counted by
        the failure limiter, like any failed login) otherwise."""

    def session_principal(self, value: str) -> Principal | None:
        """Who a session belongs to; None when it is invalid, expired or revoked."""

    async def end_session(self, value: str) -> None:
        """Log out: the session is refused from now on, by every process (nothing for a
        value that is no valid session)."""
