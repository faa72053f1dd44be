"""A tamper-evident audit log: ``HOME/audit.jsonl``, one JSON record per line, hash-chained.

Each record carries the sha256 of the previous record's line (``prev``) and of its own content
(``hash``), so editing, removing or reordering a line breaks the chain at that point, which
:func:`verify_audit_log` reports.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


class AuditLog:
    def __init__(self, home: Path) -> None:
        self.path = home / "audit.jsonl"

    def record(self, actor: str, action: str, target: str, **details: Any) -> dict[str, Any]:
        """Append one record (atomic against concurrent writers: the file is locked)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            prev = GENESIS
            for line in f:
                if line.strip():
                    prev = json.loads(line)["hash"]
            entry: dict[str, Any] = {
                "ts": round(time.time(), 3),
                "actor": actor,
                "action": action,
                "target": target,
                "details": details,
                "prev": prev,
            }
            entry["hash"] = _digest(entry)
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def verify_audit_log(path: Path) -> list[str]:
    """Problems found in the chain (empty when intact), each naming the line."""
    problems = []
    prev = GENESIS
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"{path}:{number}: not JSON")
            continue
        if entry.get("prev") != prev:
            problems.append(f"{path}:{number}: does not follow the previous record (removed or reordered lines)")
        if _digest({k: v for k, v in entry.items() if k != "hash"}) != entry.get("hash"):
            problems.append(f"{path}:{number}: content does not match its hash (edited)")
        prev = entry.get("hash", "")
    return problems


def _digest(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()
