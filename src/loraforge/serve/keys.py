"""API keys: stored as sha256 hashes in ``HOME/keys.json``; each maps to a tenant and a role.

A key is shown once, when it is created. Keys are long random strings, so a plain sha256 is
enough (no password stretching is needed against guessing). The server re-reads the file when
it changes, so ``loraforge keys revoke`` takes effect without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraforge.errors import ConfigError
from loraforge.files import open_private, private_directory, write_text_atomic
from loraforge.serve.adapter_checks import valid_name

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
    def __init__(self, home: Path) -> None:
        self.path = home / "keys.json"
        self._lock = threading.Lock()
        self._version: tuple[int, int, int] | None = None
        self._by_hash: dict[str, KeyRecord] = {}

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
        record = KeyRecord(
            id=key_id,
            hash=hash_key(key),
            tenant=tenant,
            role=role,
            created_at=time.time(),
            all_tenants=all_tenants,
        )
        with self._locked() as records:
            records.append(record)
        return key, record

    def revoke(self, key_id: str) -> KeyRecord:
        with self._locked() as records:
            for i, r in enumerate(records):
                if r.id == key_id:
                    if r.revoked_at is None:
                        records[i] = KeyRecord(**{**asdict(r), "revoked_at": time.time()})
                    return records[i]
        raise ConfigError(f"no key with id {key_id!r}; `loraforge keys list` shows the ids")

    def records(self) -> list[KeyRecord]:
        return self._read()

    def authenticate(self, key: str) -> KeyRecord | None:
        """The active record of ``key``, or None (unknown or revoked)."""
        self._refresh()
        record = self._by_hash.get(hash_key(key))
        return record if record is not None and record.active else None

    def _refresh(self) -> None:
        # The file is replaced by a rename on every change: a new inode even within one mtime tick.
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._by_hash, self._version = {}, None
            return
        version = (info.st_ino, info.st_size, info.st_mtime_ns)
        if version != self._version:
            with self._lock:
                self._by_hash = {r.hash: r for r in self._read()}
                self._version = version

    def _read(self) -> list[KeyRecord]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
            return [KeyRecord(**r) for r in list(data["keys"])]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.path} is not a valid key file ({e}); restore it from a backup") from e

    class _Locked:
        def __init__(self, store: KeyStore) -> None:
            self.store = store
            self.records: list[KeyRecord] = []

        def __enter__(self) -> list[KeyRecord]:
            private_directory(self.store.path.parent)
            self.lock = open_private(self.store.path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT)
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            self.records = self.store._read()
            return self.records

        def __exit__(self, exc_type: object, *_: object) -> None:
            try:
                if exc_type is None:
                    body = {"keys": [asdict(r) for r in self.records]}
                    write_text_atomic(self.store.path, json.dumps(body, indent=2))
            finally:
                self.lock.close()

    def _locked(self) -> KeyStore._Locked:
        return KeyStore._Locked(self)
