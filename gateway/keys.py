"""API keys: minted once, stored as hashes, verified in constant time.

A secret looks like ``ds_<key_id>_<random>``. Only its SHA-256 is stored
(the secrets are 192-bit random, so a fast hash is enough; nothing to
stretch). Verification always hashes the presented secret and compares it
with :func:`hmac.compare_digest` against the stored hash, or against a dummy
when the key id is unknown, so missing, unknown and revoked keys cost the
same and answer the same UNAUTHENTICATED.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from dreamsight_server.errors import InvalidArgument, NotFound, Unauthenticated
from gateway.store import AsyncStore, KeyRow

_SECRET = re.compile(r"^ds_([0-9a-f]{12})_[A-Za-z0-9_-]{20,64}$")
_TENANT = re.compile(r"^[a-z0-9_-]{1,64}$")
_DUMMY_HASH = hashlib.sha256(b"dreamsight-no-such-key").hexdigest()
UNKNOWN_KEY_MESSAGE = "unknown or revoked API key"
NO_KEY_MESSAGE = "no API key: send the header 'Authorization: Bearer <your dreamsight key>'"


@dataclass(frozen=True)
class Caller:
    """An authenticated tenant."""

    key_id: str
    tenant: str
    tier: str


def hash_secret(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyService:
    """Creates, lists, revokes and verifies keys, with a short verify cache."""

    def __init__(self, store: AsyncStore, tiers: set[str], cache_ttl_s: float = 5.0) -> None:
        self._store = store
        self._tiers = tiers
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Caller]] = {}

    async def create(self, tenant: str, tier: str, description: str) -> tuple[KeyRow, str]:
        """Mint a key; returns the stored row and the secret (shown once)."""
        if not _TENANT.match(tenant):
            raise InvalidArgument("tenant", "must be 1 to 64 characters of [a-z0-9_-]")
        if tier not in self._tiers:
            raise InvalidArgument("tier", f"unknown tier {tier!r} (known: {sorted(self._tiers)})")
        if len(description) > 256:
            raise InvalidArgument("description", "at most 256 characters")
        key_id = secrets.token_hex(6)
        secret = f"ds_{key_id}_{secrets.token_urlsafe(24)}"
        row = KeyRow(key_id, hash_secret(secret), tenant, tier, description, time.time(), None)
        await self._store.run(self._store.sync.create_key, row)
        return row, secret

    async def list(self, tenant: str, include_revoked: bool) -> list[KeyRow]:
        """Stored keys (never secrets)."""
        return await self._store.run(self._store.sync.list_keys, tenant, include_revoked)

    async def revoke(self, key_id: str) -> KeyRow:
        """Revoke at once; this replica forgets it immediately."""
        row = await self._store.run(self._store.sync.revoke_key, key_id, time.time())
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        self._cache = {k: v for k, v in self._cache.items() if v[1].key_id != key_id}
        return row

    async def verify(self, authorization: str | None) -> Caller:
        """The caller for an ``authorization`` header value, or Unauthenticated."""
        secret = ""
        if authorization and authorization.startswith("Bearer "):
            secret = authorization[len("Bearer ") :].strip()
        presented = hash_secret(secret)
        now = time.monotonic()
        cached = self._cache.get(presented)
        if cached is not None and cached[0] > now:
            return cached[1]
        match = _SECRET.match(secret)
        # Always one lookup, so a malformed key costs what an unknown one does.
        key_id = match.group(1) if match else "000000000000"
        row = await self._store.run(self._store.sync.get_key, key_id)
        stored = row.secret_hash if row is not None else _DUMMY_HASH
        valid = hmac.compare_digest(stored, presented)
        if not valid or row is None or row.revoked_at is not None:
            # Saying the caller sent no key reveals nothing; which keys exist stays unsaid.
            raise Unauthenticated(UNKNOWN_KEY_MESSAGE if secret else NO_KEY_MESSAGE)
        caller = Caller(row.key_id, row.tenant, row.tier)
        self._cache[presented] = (now + self._cache_ttl_s, caller)
        return caller
