"""The Authorizer used when the server config has an ``auth:`` section.

Every registry request is authenticated one of three ways: no credentials (anonymous),
``Basic`` (checked against the htpasswd and policy files) or ``Bearer`` (a token from our
token endpoint, verified here). Whatever the way, what the caller may do is then checked
against the current policy, so a revoked grant stops working within seconds even for a
token issued before the change. The token endpoint (``issue_token``) grants the
intersection of the scopes asked for and what policy allows.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from registry_server.auth import metrics, scopes
from registry_server.auth.directory import Directory
from registry_server.auth.model import (
    ANONYMOUS,
    REQUEST_ORIGIN,
    Access,
    IssuedToken,
    Principal,
    TokenError,
    TokenRequest,
)
from registry_server.auth.passwords import PasswordVerifier
from registry_server.auth.ratelimit import FailureLimiter
from registry_server.auth.reloading import AuthFiles, LoadError
from registry_server.auth.session_ends import SessionEnds
from registry_server.auth.tokens import (
    Claims,
    SigningKey,
    SigningKeyError,
    TokenCodec,
    TokenInvalid,
)
from registry_server.config import AuthConfig, ConfigError
from registry_server.protocol import errors
from registry_server.protocol.quotas import Quota
from registry_server.protocol.tag_rules import TagRules

log = logging.getLogger("registry_server.auth")

TOKEN_PATH = "/token"
GRANT_PASSWORD = "password"
GRANT_REFRESH = "refresh_token"
# How long a web UI session lasts (it also ends when the account's secret changes).
SESSION_TTL_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Settings:
    service: str
    issuer: str
    external_url: str
    token_ttl_seconds: int
    refresh_token_ttl_seconds: int

    @property
    def session_audience(self) -> str:
        # The web UI's sessions: never accepted as access or refresh tokens.
        return f"{self.service}#ui"

    @property
    def refresh_audience(self) -> str:
        # Refresh tokens are signed by the same key; a distinct audience keeps them from
        # ever being accepted as access tokens, and access tokens from being refreshed.
        return f"{self.service}#refresh"

    def realm(self) -> str:
        base = self.external_url.rstrip("/") or REQUEST_ORIGIN.get()
        return f"{base}{TOKEN_PATH}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def bearer_challenge(
    realm: str, service: str, wanted: Sequence[Access] = (), error: str | None = None
) -> str:
    parts = [f'realm="{_quote(realm)}"', f'service="{_quote(service)}"']
    scope = scopes.challenge_scope(wanted)
    if scope:
        parts.append(f'scope="{_quote(scope)}"')
    if error:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def split_authorization(header: str | None) -> tuple[str, str]:
    """("basic" | "bearer" | other lowercased scheme | "", credentials)."""
    if not header:
        return "", ""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), rest.strip()


def decode_basic(credentials: str) -> tuple[str, str] | None:
    # Header bytes that were not ASCII reach us as other characters (surrogate escapes for
    # bytes that are not UTF-8): none can be base64, so they are malformed, not an error.
    if not credentials.isascii():
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, secret = decoded.partition(":")
    if not sep or not name:
        return None
    return name, secret


def secret_fingerprint(stored_hash: str) -> str:
    """Ties a refresh token to the credential it came from: rotating it revokes the token."""
    return hashlib.sha256(stored_hash.encode()).hexdigest()[:16]


def _rfc3339(timestamp: int) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfiguredAuthorizer:
    def __init__(
        self,
        settings: Settings,
        files: AuthFiles,
        codec: TokenCodec,
        passwords: PasswordVerifier,
        limiter: FailureLimiter,
    ) -> None:
        self.settings = settings
        self.files = files
        self.codec = codec
        self.passwords = passwords
        self.limiter = limiter
        # Where logging out is recorded for every process; set by the app, which owns
        # the index. Without it a logout only removes the browser's cookie.
        self.session_ends: SessionEnds | None = None

    @property
    def directory(self) -> Directory:
        return self.files.directory

    def tag_rules(self, repository: str) -> TagRules:
        return self.files.directory.policy.tag_rules(repository)

    def quota(self, repository: str) -> Quota:
        return self.files.directory.policy.quota(repository)

    def credential_fingerprint(self, name: str) -> str | None:
        account = self.directory.accounts.get(name)
        return secret_fingerprint(account.secret_hash) if account is not None else None

    # -- lifecycle --

    async def start(self) -> None:
        await self.files.start()

    async def stop(self) -> None:
        await self.files.stop()

    # -- failures --

    def _failed(self, client: str, reason: str, account: str | None = None) -> None:
        metrics.FAILURES.labels(reason).inc()
        self.limiter.record_failure(client, account)
        log.warning(
            "authentication failed",
            extra={"client": client, "reason": reason, "account": account or ""},
        )

    def _check_rate(self, client: str, account: str | None = None) -> None:
        wait = self.limiter.retry_after(client, account)
        if wait:
            metrics.RATE_LIMITED.inc()
            raise errors.RegistryError(
                errors.TOO_MANY_REQUESTS,
                message="too many failed authentication attempts",
                headers={"Retry-After": str(wait)},
            )

    def _unauthorized(
        self, wanted: Sequence[Access], error: str | None = None, message: str | None = None
    ) -> errors.RegistryError:
        challenge = bearer_challenge(self.settings.realm(), self.settings.service, wanted, error)
        return errors.RegistryError(
            errors.UNAUTHORIZED, message=message, headers={"WWW-Authenticate": challenge}
        )

    async def _login(self, directory: Directory, name: str, secret: str, client: str) -> bool:
        self._check_rate(client, name)
        account = directory.accounts.get(name)
        # A refusal costs the same bcrypt work whether the name exists or not.
        stored = account.secret_hash if account is not None else None
        with self.limiter.checking(client, name, secret):  # counted from now, not once failed
            if await self.passwords.check(secret, stored, directory.costs):
                return True
        self._failed(client, "bad_secret" if account is not None else "unknown_account", name)
        return False

    # -- the Authorizer protocol --

    async def authorize(
        self, authorization: str | None, client: str, wanted: Sequence[Access]
    ) -> Principal:
        scheme, credentials = split_authorization(authorization)
        if scheme == "":
            # /v2/ (nothing wanted) always challenges, so clients learn to authenticate.
            if wanted and all(self.directory.permits(None, a) for a in wanted):
                return ANONYMOUS
            raise self._unauthorized(wanted)
        # The client's own meter here; the account's, once the name is known (_login).
        self._check_rate(client)
        if scheme == "basic":
            return await self._authorize_basic(credentials, client, wanted)
        if scheme == "bearer":
            return self._authorize_bearer(credentials, client, wanted)
        self._failed(client, "unsupported_scheme")
        scheme = scheme[:40]
        raise self._unauthorized(wanted, message=f"unsupported authorization scheme {scheme!r}")

    async def _authorize_basic(
        self, credentials: str, client: str, wanted: Sequence[Access]
    ) -> Principal:
        pair = decode_basic(credentials)
        if pair is None:
            self._failed(client, "malformed_basic")
            raise self._unauthorized(wanted)
        name, secret = pair
        directory = self.directory  # one snapshot for the whole decision
        if not await self._login(directory, name, secret, client):
            raise self._unauthorized(wanted, message="invalid username or password")
        for access in wanted:
            if not directory.permits(name, access):
                raise errors.RegistryError(errors.DENIED, detail={"scope": access.scope()})
        return directory.principal(name)

    def _authorize_bearer(self, token: str, client: str, wanted: Sequence[Access]) -> Principal:
        try:
            claims = self.codec.verify(token, self.settings.service)
        except TokenInvalid as exc:
            self._failed(client, "invalid_token")
            log.info("token refused", extra={"client": client, "why": str(exc)})
            raise self._unauthorized(wanted, "invalid_token", f"invalid token: {exc}") from None
        directory = self.directory
        name = claims.subject or None
        if name is not None and name not in directory.accounts:
            self._failed(client, "unknown_subject", name)
            raise self._unauthorized(wanted, "invalid_token", "the token's account is gone")
        for access in wanted:
            in_token = scopes.covers(claims.access, access)
            by_policy = directory.permits(name, access)
            if in_token and by_policy:
                continue
            if name is not None and not by_policy:
                raise errors.RegistryError(errors.DENIED, detail={"scope": access.scope()})
            # Allowed but not asked for (a token for another repository), or anonymous:
            # the client should fetch a token for exactly this scope.
            raise self._unauthorized(wanted, "insufficient_scope")
        return directory.principal(name)

    async def allowed(self, principal: Principal, access: Access) -> bool:
        return self.directory.permits(principal.name or None, access)

    # -- web UI sessions --

    async def open_session(self, name: str, secret: str, client: str) -> str:
        self._check_rate(client)
        directory = self.directory
        if not await self._login(directory, name, secret, client):
            raise errors.RegistryError(errors.UNAUTHORIZED, message="invalid username or password")
        account = directory.accounts[name]
        token, _ = self.codec.issue(
            name,
            self.settings.session_audience,
            SESSION_TTL_SECONDS,
            extra={"cred": secret_fingerprint(account.secret_hash)},
        )
        return token

    def session_principal(self, value: str) -> Principal | None:
        claims = self._session_claims(value)
        if claims is None:
            return None
        directory = self.directory
        account = directory.accounts.get(claims.subject)
        if account is None or claims.extra.get("cred") != secret_fingerprint(account.secret_hash):
            return None
        return directory.principal(claims.subject)

    async def end_session(self, value: str) -> None:
        claims = self._session_claims(value)
        if claims is not None and self.session_ends is not None:
            await self.session_ends.end(claims.token_id, claims.expires_at)

    def _session_claims(self, value: str) -> Claims | None:
        """A session's claims: None when it is invalid, expired or logged out."""
        try:
            claims = self.codec.verify(value, self.settings.session_audience)
        except TokenInvalid:
            return None
        if self.session_ends is not None and self.session_ends.ended(claims.token_id):
            return None
        return claims

    # -- the token endpoint --

    async def issue_token(self, request: TokenRequest) -> IssuedToken:
        if request.service is not None and request.service != self.settings.service:
            raise TokenError(400, "invalid_request", f"unknown service {request.service!r}")
        self._check_rate(request.client)
        directory = self.directory  # one snapshot for the whole decision
        name = await self._token_subject(directory, request)
        granted = directory.grant(name, scopes.parse_scopes(request.scopes))
        ttl = self.settings.token_ttl_seconds
        token, claims = self.codec.issue(name or "", self.settings.service, ttl, granted)
        metrics.TOKENS_ISSUED.labels("access").inc()
        refresh = None
        if request.offline and name is not None:
            account = directory.accounts[name]
            refresh, _ = self.codec.issue(
                name,
                self.settings.refresh_audience,
                self.settings.refresh_token_ttl_seconds,
                extra={"cred": secret_fingerprint(account.secret_hash)},
            )
            metrics.TOKENS_ISSUED.labels("refresh").inc()
        return IssuedToken(
            token=token,
            expires_in=ttl,
            issued_at=_rfc3339(claims.issued_at),
            scope=scopes.challenge_scope(granted),
            refresh_token=refresh,
        )

    async def _token_subject(self, directory: Directory, request: TokenRequest) -> str | None:
        """The authenticated account name, or None for an anonymous request."""
        grant = request.grant_type
        if grant is None:
            scheme, credentials = split_authorization(request.authorization)
            if scheme == "":
                return None
            pair = decode_basic(credentials) if scheme == "basic" else None
            if pair is None:
                self._failed(request.client, "malformed_basic")
                raise TokenError(401, "invalid_client", "expected Basic credentials")
            return await self._token_login(directory, *pair, request.client, status=401)
        if grant == GRANT_PASSWORD:
            if not request.username or request.password is None:
                raise TokenError(400, "invalid_request", "username and password are required")
            return await self._token_login(
                directory, request.username, request.password, request.client, status=400
            )
        if grant == GRANT_REFRESH:
            return self._refresh_subject(directory, request.refresh_token or "", request.client)
        raise TokenError(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported")

    async def _token_login(
        self, directory: Directory, name: str, secret: str, client: str, status: int
    ) -> str:
        if not await self._login(directory, name, secret, client):
            headers = {"WWW-Authenticate": f'Basic realm="{_quote(self.settings.service)}"'}
            raise TokenError(
                status,
                "invalid_grant" if status == 400 else "invalid_client",
                "invalid username or password",
                headers if status == 401 else None,
            )
        return name

    def _refresh_subject(self, directory: Directory, token: str, client: str) -> str:
        try:
            claims = self.codec.verify(token, self.settings.refresh_audience)
        except TokenInvalid as exc:
            self._failed(client, "invalid_refresh_token")
            raise TokenError(400, "invalid_grant", f"invalid refresh token: {exc}") from None
        account = directory.accounts.get(claims.subject)
        if account is None or claims.extra.get("cred") != secret_fingerprint(account.secret_hash):
            self._failed(client, "revoked_refresh_token", claims.subject)
            raise TokenError(400, "invalid_grant", "the refresh token has been revoked")
        return claims.subject


def build(config: AuthConfig, external_url: str) -> ConfiguredAuthorizer:
    """The Authorizer for an ``auth:`` config section; invalid files stop the start-up."""
    if config.signing_key is not None:
        try:
            key = SigningKey.load(config.signing_key)
        except SigningKeyError as exc:
            raise ConfigError(f"auth.signing_key: {exc}") from None
    else:
        key = SigningKey.generate()
        log.warning(
            "no auth.signing_key configured: generated a key in memory; "
            "tokens will not survive a restart and are not shared between processes"
        )
    files = AuthFiles(config.htpasswd, config.policy, config.reload_interval_seconds)
    try:
        files.load()
    except LoadError as exc:
        raise ConfigError(f"auth: {exc}") from None
    settings = Settings(
        service=config.service,
        issuer=config.issuer,
        external_url=external_url,
        token_ttl_seconds=config.token_ttl_seconds,
        refresh_token_ttl_seconds=config.refresh_token_ttl_seconds,
    )
    log.info(
        "authentication enabled",
        extra={
            "service": config.service,
            "algorithm": key.algorithm,
            "accounts": len(files.directory.accounts),
            "policy": str(config.policy) if config.policy else "(none: accounts have all rights)",
        },
    )
    return ConfiguredAuthorizer(
        settings,
        files,
        TokenCodec(key, config.issuer),
        PasswordVerifier(config.credential_cache_seconds),
        FailureLimiter(
            config.failure_limit,
            config.failure_window_seconds,
            client_limit=config.client_failure_limit,
        ),
    )
