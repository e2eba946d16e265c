"""The access model shared by the HTTP layer and the auth implementations (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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
