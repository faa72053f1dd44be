"""The audit log's record format: how a record is sealed into the chain, and how the log is read from its end.

See :mod:`loraforge.govern.audit` for the format and what it detects.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from typing import Any

from loraforge.errors import AuditError

BLOCK = 8192  # bytes read per step when scanning the log backwards


def canonical(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` as it reads back from JSON, so the hash written is the hash verification recomputes."""
    out: dict[str, Any] = json.loads(json.dumps(entry, default=str))
    return out


def seal(entry: dict[str, Any], key: bytes | None) -> str:
    """HMAC-SHA256 of the sorted JSON of ``entry`` (plain sha256 without a key: the unkeyed format)."""
    body = json.dumps(entry, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest() if key is not None else hashlib.sha256(body).hexdigest()


def lines_backwards(fd: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Complete lines of ``fd`` before offset ``end`` (just after a newline), last first, as (start, line).

    Reads 8 KiB blocks backwards from ``end`` only as far as the lines consumed reach.
    """
    pos, buf = end, b""  # buf holds bytes [pos, end)
    while end > 0:
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0 or pos == 0:
            start = pos + cut + 1
            yield start, buf[cut + 1 : -1]
            buf, end = buf[: cut + 1], start
            continue
        step = min(BLOCK, pos)
        pos -= step
        block = os.pread(fd, step, pos)
        if len(block) != step:
            raise AuditError(f"the audit log changed while being read (short read at byte {pos})")
        buf = block + buf


def complete_end(fd: int, size: int) -> int:
    """Offset just after the last newline (0 if none): where the complete lines end and a torn tail starts."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    pos = size
    while pos > 0:
        step = min(BLOCK, pos)
        block = os.pread(fd, step, pos - step)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return pos - step + cut + 1
        pos -= step
    return 0
