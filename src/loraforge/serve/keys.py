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
from loraforge.govern.release import ROLES
from loraforge.registry.database import Registry
from loraforge.registry.schema import ApiKey, ensure_tenant
from loraforge.serve.adapter_checks import valid_name
from loraforge.serve.home_registry import home_registry

GLOBAL_ROLES = ("admin", "approver", "auditor")  # roles a key for every tenant may have
ENVIRONMENTS = ("development", "production")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    hash: str
    tenant: str
    role: str
    created_at: float
    revoked_at: float | None = None
    all_tenants: bool = False  # an admin key for every tenant (``--global``); else for its own only
    owner: str | None = None  # the person it belongs to (separation of duties compares people)
    environment: str = "development"  # production keys reach deployed routes only

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The keys of ``home``'s registry (or of ``registry``, when the caller has one open)."""

    def __init__(self, home: Path, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else home_registry(home)

    def create(
        self,
        tenant: str,
        role: str = "user",
        *,
        all_tenants: bool = False,
        owner: str | None = None,
        environment: str = "development",
    ) -> tuple[str, KeyRecord]:
        """A new key for ``tenant``; returns (the key — shown once —, its record).

        Args:
            role: ``user`` or ``developer`` (inference, files, jobs), ``approver`` (approves
                releases), ``auditor`` (reads reports and logs), ``admin`` (deploys, manages).
            all_tenants: a key that acts for every tenant (an admin, approver or auditor key is
                scoped to its own tenant otherwise).
            owner: the person the key belongs to: nobody approves what they created, with any key.
            environment: ``production`` keys reach deployed routes only.
        """
        if not valid_name(tenant):
            raise ConfigError(f"tenant name {tenant!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if all_tenants and role not in GLOBAL_ROLES:
            raise ConfigError(f"only {', '.join(GLOBAL_ROLES)} keys can act for all tenants (--global)")
        if environment not in ENVIRONMENTS:
            raise ConfigError(f"environment {environment!r} is not one of {', '.join(ENVIRONMENTS)}")
        owner = owner.strip() if owner else None
        if owner is not None and not 0 < len(owner) <= 128:
            raise ConfigError("a key's owner is 1 to 128 characters (a person's name or e-mail)")
        key_id = secrets.token_hex(4)
        key = f"lf-{key_id}-{secrets.token_urlsafe(32)}"
        now = time.time()
        row = ApiKey(
            id=key_id,
            hash=hash_key(key),
            tenant=tenant,
            role=role,
            all_tenants=all_tenants,
            created_at=now,
            owner=owner,
            environment=environment,
        )
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
        owner=row.owner,
        environment=row.environment or "development",
    )
