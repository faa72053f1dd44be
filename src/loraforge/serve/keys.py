"""API keys: stored as sha256 hashes in the registry (``api_keys``); each maps to a tenant and a role.

A key is shown once, when it is created. Keys are long random strings, so a plain sha256 is
enough (no password stretching is needed against guessing). Every request looks its key up in the
registry (a read that never waits for a writer), so ``loraforge keys revoke`` takes effect at the
next request of every server sharing the registry, without a restart.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from loraforge.errors import ConfigError
from loraforge.registry.database import Registry
from loraforge.registry.schema import ApiKey, ensure_tenant
from loraforge.serve.adapter_checks import valid_name
from loraforge.serve.home_registry import home_registry

ROLES = ("user", "admin")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    hash: str
    tenant: str
    role: str
    created_at: float
    revoked_at: float | None = None
    all_tenants: bool = False  # an admin key for every tenant (``--global``); else for its own only

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The keys of ``home``'s registry (or of ``registry``, when the caller has one open)."""

    def __init__(self, home: Path, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else home_registry(home)

    def create(self, tenant: str, role: str = "user", *, all_tenants: bool = False) -> tuple[str, KeyRecord]:
        """A new key for ``tenant``; returns (the key — shown once —, its record).

        Args:
            all_tenants: an admin key that acts for every tenant (an admin key is scoped to its
                own tenant otherwise).
        """
        if not valid_name(tenant):
            raise ConfigError(f"tenant name {tenant!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if all_tenants and role != "admin":
            raise ConfigError("only an admin key can act for all tenants (--global needs --role admin)")
        key_id = secrets.token_hex(4)
        key = f"lf-{key_id}-{secrets.token_urlsafe(32)}"
        now = time.time()
        row = ApiKey(id=key_id, hash=hash_key(key), tenant=tenant, role=role, all_tenants=all_tenants, created_at=now)
        with self.registry.session() as s:
            ensure_tenant(s, tenant, now)
            s.add(row)
        return key, _record(row)

    def revoke(self, key_id: str) -> KeyRecord:
        with self.registry.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise ConfigError(f"no key with id {key_id!r}; `loraforge keys list` shows the ids")
            if row.revoked_at is None:
                row.revoked_at = time.time()
            return _record(row)

    def records(self) -> list[KeyRecord]:
        with self.registry.reading() as s:
            return [_record(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))]

    def authenticate(self, key: str) -> KeyRecord | None:
        """The active record of ``key``, or None (unknown or revoked)."""
        with self.registry.reading() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.hash == hash_key(key)))
            return _record(row) if row is not None and row.revoked_at is None else None


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        hash=row.hash,
        tenant=row.tenant,
        role=row.role,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        all_tenants=bool(row.all_tenants),
    )
