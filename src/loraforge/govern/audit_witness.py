"""The registry as the audit log's witness: its count and last hash, outside the home's files.

``audit.head`` beside the log catches a log whose last records were deleted, but not a rollback of
*both* files to an earlier consistent state. After every append the writer also records the count
and hash in the registry's ``audit_heads`` (one short transaction, under the log's lock, so writers
record in order; a row is only ever moved forward). ``loraforge audit verify`` compares the log
with it: whoever can write the home but not the database cannot hide deleted records. For a
witness outside both, ``loraforge audit verify`` prints the head to copy elsewhere, and
``loraforge audit export`` streams the records to a SIEM.

A witness that cannot be written (the database is down) does not stop the action being audited:
the record is in the log already; a warning is logged and the registry catches up at the next append.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from loraforge.govern.audit import AuditLog
from loraforge.registry.database import Registry
from loraforge.registry.schema import AuditHead

log = logging.getLogger("loraforge.audit")


def log_identity(path: Path) -> str:
    """The name of a log in ``audit_heads``: its absolute path (hashed when too long for the column)."""
    name = str(path.resolve())
    return name if len(name) <= 255 else "sha256:" + hashlib.sha256(name.encode()).hexdigest()


class RegistryWitness:
    """Record ``(count, hash)`` of the log at ``path`` in ``registry``; read it back for verification."""

    def __init__(self, registry: Registry, path: Path) -> None:
        self.registry = registry
        self.log = log_identity(path)

    def __call__(self, count: int, digest: str) -> None:
        now = time.time()
        try:
            with self.registry.session() as s:
                moved = s.execute(
                    update(AuditHead)
                    .where(AuditHead.log == self.log, AuditHead.count < count)
                    .values(count=count, hash=digest, updated_at=now)
                ).rowcount  # type: ignore[attr-defined]
                if not moved and s.get(AuditHead, self.log) is None:
                    s.add(AuditHead(log=self.log, count=count, hash=digest, updated_at=now))
        except SQLAlchemyError as e:
            log.warning("the registry's audit head could not be updated (record %d): %s", count, e)

    def head(self) -> dict[str, Any] | None:
        """``{"count", "hash", "updated_at"}`` as the registry last saw the log; None if it never did."""
        with self.registry.reading() as s:
            row = s.get(AuditHead, self.log)
            return None if row is None else {"count": row.count, "hash": row.hash, "updated_at": row.updated_at}


def audit_log(home: Path, registry: Registry, key_file: Path | None = None) -> AuditLog:
    """``HOME/audit.jsonl`` with the registry as its witness: what every writer with a registry uses."""
    return AuditLog(home, key_file, witness=RegistryWitness(registry, home / "audit.jsonl"))
