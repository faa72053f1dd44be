"""API keys: stored as sha256 hashes in ``HOME/keys.json``; each maps to a tenant and a role.

A key is shown once, when it is created. Keys are long random strings, so a plain sha256 is
enough (no password stretching is needed against guessing). The server re-reads the file when
it changes, so ``loraforge keys revoke`` takes effect without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraforge._atomic import write_text_atomic
from loraforge.errors import ConfigError
from loraforge.serve.adapters import NAME_RE

ROLES = ("user", "admin")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    hash: str
    tenant: str
    role: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, home: Path) -> None:
        self.path = home / "keys.json"
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._by_hash: dict[str, KeyRecord] = {}

    def create(self, tenant: str, role: str = "user") -> tuple[str, KeyRecord]:
        """A new key for ``tenant``; returns (the key — shown once —, its record)."""
        if not NAME_RE.match(tenant):
            raise ConfigError(f"tenant name {tenant!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
        key_id = secrets.token_hex(4)
        key = f"lf-{key_id}-{secrets.token_urlsafe(32)}"
        record = KeyRecord(id=key_id, hash=hash_key(key), tenant=tenant, role=role, created_at=time.time())
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
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._by_hash, self._mtime = {}, None
            return
        if mtime != self._mtime:
            with self._lock:
                self._by_hash = {r.hash: r for r in self._read()}
                self._mtime = mtime

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
            self.store.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.store.path.with_suffix(".lock"), "w")
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            self.records = self.store._read()
            return self.records

        def __exit__(self, exc_type: object, *_: object) -> None:
            try:
                if exc_type is None:
                    body = {"keys": [asdict(r) for r in self.records]}
                    write_text_atomic(self.store.path, json.dumps(body, indent=2))
                    self.store.path.chmod(0o600)
            finally:
                self.lock.close()

    def _locked(self) -> KeyStore._Locked:
        return KeyStore._Locked(self)
