"""API keys: ``Authorization: Bearer <key>`` with a read or a write scope (write includes read).

Keys come from ``api_keys`` (``DINOSERVE_API_KEYS``: entries separated by commas) and ``api_keys_file``
(``DINOSERVE_API_KEYS_FILE``: one entry per line; ``#`` starts a comment, blank lines are ignored). An entry
is ``KEY`` (read and write), ``KEY:read`` or ``KEY:write``. Only the keys' SHA-256 digests are kept; a
presented key's digest is compared with every configured digest by ``hmac.compare_digest`` (RFC 6750 for
the header and the ``WWW-Authenticate`` challenges).

``auth`` (``DINOSERVE_AUTH``) says whether keys are required: ``auto`` requires them when any are configured
and, without any, serves on a loopback address only (it refuses to start on any other); ``on`` requires them
always; ``off`` serves every endpoint to everyone, even on a public address.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .schemas import ErrorResponse
from .settings import Settings, SettingsError

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
KEY_CHARACTERS = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 token characters: no ':', ',', '#' or spaces
SET_KEYS = ("set DINOSERVE_API_KEYS=KEY[:read|:write],... or DINOSERVE_API_KEYS_FILE=PATH (--api-keys-file; one "
            "entry per line)")


class Scope(enum.Enum):
    READ = "read"
    WRITE = "write"  # includes read


class AuthConfigError(SettingsError):
    """The key settings do not allow the gateway to start; the message says what to change."""


def parse_entry(entry: str) -> tuple[str, Scope]:
    """``KEY``, ``KEY:read`` or ``KEY:write`` → (key, scope). The messages never repeat the key."""
    key, colon, scope = entry.partition(":")
    if colon and scope not in {s.value for s in Scope}:
        raise ValueError(f"unknown scope {scope!r}: an entry is KEY, KEY:read or KEY:write")
    if not KEY_CHARACTERS.fullmatch(key):
        raise ValueError("a key may hold only letters, digits and . _ ~ + / = -")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the key has {len(key)} characters; keys need at least {MIN_KEY_LENGTH} "
                         f"(make one with `openssl rand -hex 32`)")
    return key, Scope(scope) if colon else Scope.WRITE


def file_entries(text: str, source: str) -> list[tuple[str, str]]:
    """(where, entry) of each key line of a keys file: ``#`` comments and blank lines left out."""
    lines = ((number, line.split("#", 1)[0].strip()) for number, line in enumerate(text.splitlines(), 1))
    return [(f"{source} line {number}", entry) for number, entry in lines if entry]


def list_entries(text: str, source: str) -> list[tuple[str, str]]:
    """(where, entry) of each comma-separated entry; empty entries (a trailing comma) are left out."""
    entries = (entry.strip() for entry in text.split(","))
    return [(f"{source} entry {number}", entry) for number, entry in enumerate(entries, 1) if entry]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The configured keys as (SHA-256 digest, scope) pairs; the keys themselves are not kept."""

    def __init__(self, entries: Iterable[tuple[str, str]]):
        """``entries``: (where, entry) pairs; ValueError naming ``where`` for a malformed or repeated entry."""
        self._digests: list[tuple[bytes, Scope]] = []
        seen: dict[bytes, str] = {}
        for where, entry in entries:
            try:
                key, scope = parse_entry(entry)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            digest = _digest(key)
            if digest in seen:
                raise ValueError(f"{where}: the same key as {seen[digest]}")
            seen[digest] = where
            self._digests.append((digest, scope))

    def __len__(self) -> int:
        return len(self._digests)

    def count(self, scope: Scope) -> int:
        return sum(s is scope for _, s in self._digests)

    def scope_of(self, key: str) -> Scope | None:
        """The scope of ``key``, None if it is unknown. Every configured digest is compared, matched or not,
        so the time taken does not tell which entry (if any) matched."""
        digest = _digest(key)
        found = None
        for candidate, scope in self._digests:
            if hmac.compare_digest(digest, candidate):
                found = scope
        return found


def load_api_keys(settings: Settings) -> ApiKeys:
    """The keys of ``api_keys`` and ``api_keys_file``; ValueError naming the entry or line at fault."""
    entries = list_entries(settings.api_keys.get_secret_value(), "DINOSERVE_API_KEYS") if settings.api_keys else []
    if settings.api_keys_file is not None:
        try:
            text = settings.api_keys_file.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the API keys file {settings.api_keys_file}: {error}") from None
        entries += file_entries(text, str(settings.api_keys_file))
    return ApiKeys(entries)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any address
        return False


def gateway_keys(settings: Settings) -> ApiKeys | None:
    """The keys the gateway requires, or None when it serves without them (see the module docstring).
    AuthConfigError, in one line, when it must not start."""
    sources = [name for name, value in (("DINOSERVE_API_KEYS", settings.api_keys),
                                         (str(settings.api_keys_file), settings.api_keys_file)) if value is not None]
    if settings.auth == "off":
        if sources:
            log.warning("auth is off: the configured API keys are ignored")
        if not is_loopback(settings.host):
            log.warning("auth is off on %s: anyone who reaches it may read and change every collection",
                        settings.host)
        return None
    try:
        keys = load_api_keys(settings)
    except ValueError as error:
        raise AuthConfigError(str(error)) from None
    if keys:
        return keys
    if sources:
        raise AuthConfigError(f"no API keys in {' or '.join(sources)}: add entries KEY, KEY:read or KEY:write")
    if settings.auth == "on":
        raise AuthConfigError(f"auth is on but no API keys are configured: {SET_KEYS}")
    if not is_loopback(settings.host):
        raise AuthConfigError(f"refusing to serve on {settings.host} without API keys: {SET_KEYS}; or set "
                              f"DINOSERVE_AUTH=off (--auth off) to let anyone use every endpoint")
    return None


def _challenge(error: str | None = None) -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="dinoserve"' + (f', error="{error}"' if error else "")}


@dataclass(frozen=True)
class Access:
    """Route dependencies and documented responses for the two scopes; all empty when auth is off, so that
    the OpenAPI schema declares security exactly where it is enforced."""

    read: list = field(default_factory=list)
    write: list = field(default_factory=list)
    read_responses: dict = field(default_factory=dict)
    write_responses: dict = field(default_factory=dict)


def access_control(keys: ApiKeys | None) -> Access:
    """The dependencies that check ``keys``: 401 for a missing or unknown key, 403 for a read key on a
    write endpoint."""
    if keys is None:
        return Access()
    bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                        description="An API key of this gateway: `Authorization: Bearer <key>`. Changing "
                                    "collections needs a key with the write scope.")

    async def authenticate(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Scope:
        if credentials is None:
            raise ApiError(401, "missing_api_key", "this endpoint needs an API key: send the header "
                                                   "'Authorization: Bearer <key>'", headers=_challenge())
        scope = keys.scope_of(credentials.credentials)
        if scope is None:
            raise ApiError(401, "invalid_api_key", "unknown API key", headers=_challenge("invalid_token"))
        return scope

    async def require_write(scope: Scope = Depends(authenticate)) -> None:
        if scope is not Scope.WRITE:
            raise ApiError(403, "insufficient_scope",
                           "this API key may only read: changing a collection needs a key with the write scope",
                           headers=_challenge("insufficient_scope"))

    unauthorized = {401: {"model": ErrorResponse, "description": "missing or unknown API key"}}
    forbidden = {403: {"model": ErrorResponse, "description": "a read key on an endpoint that needs write"}}
    return Access(read=[Depends(authenticate)], write=[Depends(require_write)], read_responses=unauthorized,
                  write_responses={**unauthorized, **forbidden})
