"""The audit log: ``HOME/audit.jsonl``, one JSON record per line, chained and keyed; ``HOME/audit.head``.

Records and files::

    audit.jsonl   {"seq": 7, "ts": …, "actor": "cli:ana", "action": "key.create", "target": "tenant:acme",
                   "phase": "intent", "details": {…}, "prev": <hash of record 6>, "mac_key": "…", "hash": …}
    audit.head    {"count": 7, "hash": <hash of record 7>}      (replaced atomically after each append)
    audit key     32+ random bytes outside the home: $LORAFORGE_AUDIT_KEY_FILE, else
                  $XDG_CONFIG_HOME/loraforge/audit.key (~/.config/…), created 0600 on first append

``hash`` is HMAC-SHA256(key, the record without ``hash``, as sorted JSON); ``prev`` is the previous
record's hash (64 zeros for the first); ``seq`` counts records from 1; ``mac_key`` names the key.
Logs written before the key existed start with unkeyed records (plain sha256, no ``seq``): the first
keyed record's HMAC covers their last hash, so they stay protected as a prefix; every record after
it must be keyed, and a log with no keyed record at all is reported (its chain proves nothing).

What each mechanism detects, and what it cannot:

- The chain (``prev``) and the numbering (``seq``): an edited, removed, inserted or reordered line,
  *unless whoever changed it recomputed the hashes* — which anyone can do with plain sha256.
- The key: recomputing is impossible without it, so edits, removals and forged records are caught
  as long as the key is out of the attacker's reach (a different user, a secret store). An attacker
  who can read the key can rewrite everything; keep it outside the home and its backups.
- The head: a prefix of a valid chain is itself valid, so deleting the *last* records leaves no
  trace in the log; ``audit.head`` records how many records there were and the last hash, and
  :func:`verify_audit_log` reports a log that ends before its head. An attacker who can write the
  home can roll *both* files back to an earlier consistent state, replace both with another home's
  files written with the same key, or delete both: nothing inside the home can detect that.
  ``loraforge audit verify`` prints the head; copying it somewhere the attacker cannot write (a
  ticket, write-once storage) and comparing later is the defence.
- A writer that finds the log shorter than its head, or the head missing or not matching, appends
  an ``audit.truncated`` / ``audit.head_missing`` / ``audit.head_mismatch`` record before its own,
  so the evidence survives later appends; verification reports those records for good.
- A crash mid-write leaves a torn last line (partial JSON, no newline). The next append moves those
  bytes aside to ``audit.jsonl.torn-<time>`` (0600), logs an ``audit.repair`` record naming them,
  and continues; verification passes again. Until then verification reports the torn line.

Writers (the CLI, the server, several processes) take an exclusive ``flock`` on the log; an append
reads the head and the log's last line (scanning back from the end), never the whole file. Files
are created 0600 and directories this module creates 0700.

Admin actions use :meth:`AuditLog.action`: an ``intent`` record is written before the action runs
(if it cannot be written, the action does not run), and a ``done`` or ``failed`` record (with the
error) after. An intent without an outcome means the process stopped during the action.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import AuditError
from loraforge.govern.audit_chain import canonical, complete_end, lines_backwards, seal
from loraforge.govern.audit_key import (
    KEY_ENV,
    default_key_file,
    fsync_directory,
    key_id,
    load_or_create_key,
    make_private_dirs,
    read_key,
    replace_file_durably,
    write_new_file,
)

GENESIS = "0" * 64
HEAD_NAME = "audit.head"
# records a writer appends when it finds the log and its head disagree: evidence, reported by verify
ANOMALIES = ("audit.truncated", "audit.head_missing", "audit.head_mismatch")


def head_path(log: Path) -> Path:
    """``HOME/audit.head`` for ``HOME/audit.jsonl``."""
    return log.with_name(HEAD_NAME)


def read_head(path: Path) -> dict[str, Any] | None:
    """``{"count": N, "hash": …}`` from ``HOME/audit.head``; None when absent (``unreadable`` when not a head)."""
    try:
        head = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"count": None, "hash": None, "unreadable": True}
    return head if isinstance(head, dict) else {"count": None, "hash": None, "unreadable": True}


@dataclass
class AuditAction:
    """An admin action in progress: its intent record, and details to add to its outcome record."""

    intent: dict[str, Any]
    outcome: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Tail:
    count: int  # records in the log
    last: dict[str, Any] | None  # the last record
    end: int  # offset after the last complete line


class AuditLog:
    """Append to and read ``HOME/audit.jsonl``.

    Args:
        home: the installation's home directory.
        key_file: the HMAC key (default :func:`default_key_file`, read when first needed). Every
            process writing one home must use the same key: an append with another key is refused.
    """

    def __init__(
        self, home: Path, key_file: Path | None = None, witness: Callable[[int, str], None] | None = None
    ) -> None:
        self.path = home / "audit.jsonl"
        self.head_path = head_path(self.path)
        self.key_file = key_file or default_key_file()
        self.witness = witness  # told (count, hash) after each append, under the lock: the registry's copy
        self._key: bytes | None = None

    def record(self, actor: str, action: str, target: str, **details: Any) -> dict[str, Any]:
        """Append one record and return it (durable when this returns: fsync'd, head updated).

        Raises:
            AuditError: the key cannot be read or made, or is not the key the log was written with,
                or the log's last complete line is not a record.
        """
        return self._append([{"actor": actor, "action": action, "target": target, "details": details}])[-1]

    @contextlib.contextmanager
    def action(self, actor: str, action: str, target: str, **details: Any) -> Iterator[AuditAction]:
        """Log the intent of an admin action before its block runs, and its outcome after.

        ``with log.action("cli:ana", "key.create", "tenant:acme", role="user") as act: …;
        act.outcome["key_id"] = rec.id`` writes ``phase: "intent"`` (with ``details``) before the
        block, then ``phase: "done"`` (with ``act.outcome``), or ``phase: "failed"`` with
        ``error: "Type: message"`` when the block raises (the exception propagates). Outcome
        records carry ``intent``: the ``seq`` of their intent record. Never put secrets in details.

        Raises:
            AuditError: the intent cannot be written; the block does not run.
        """
        base = {"actor": actor, "action": action, "target": target}
        intent = self._append([{**base, "phase": "intent", "details": details}])[-1]
        act = AuditAction(intent)
        try:
            yield act
        except BaseException as e:
            failed = {
                **base,
                "phase": "failed",
                "intent": intent["seq"],
                "error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
            }
            self._append([{**failed, "details": act.outcome}])
            raise
        self._append([{**base, "phase": "done", "intent": intent["seq"], "details": act.outcome}])

    def repair(self) -> list[dict[str, Any]]:
        """Do what an append does before writing (move a torn tail aside, record a disagreeing head)
        without a record of its own; returns the records it appended (none when all is well)."""
        return self._append([])

    def entries(self) -> list[dict[str, Any]]:
        """Every complete record, oldest first (a torn last line is left out).

        Raises:
            AuditError: a complete line is not JSON (``loraforge audit verify`` names it).
        """
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        out = []
        for number, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), 1):
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise AuditError(f"{self.path}:{number}: not a JSON record; run `loraforge audit verify`") from e
        return out

    def _key_now(self) -> bytes:
        if self._key is None:
            self._key = load_or_create_key(self.key_file)
        return self._key

    def _append(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        key = self._key_now()
        kid = key_id(key)
        make_private_dirs(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:  # a log from before files were made 0600
                with contextlib.suppress(PermissionError):
                    os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            written: list[dict[str, Any]] = []
            tail = self._tail(fd)
            last = tail.last
            if last is not None and "mac_key" in last and last["mac_key"] != kid:
                raise AuditError(
                    f"{self.path} was written with audit key id {last['mac_key']}, but {self.key_file} has id {kid}; "
                    f"set {KEY_ENV} to the key file the other writers use (or move the log and "
                    f"{self.head_path.name} aside, kept as evidence, to start a new log)"
                )
            torn = self._move_torn_tail(fd, tail.end)
            count, prev = tail.count, (last or {}).get("hash", GENESIS)
            pending = []
            if torn:
                pending.append({"actor": "audit", "action": "audit.repair", "target": self.path.name, "details": torn})
            pending += self._head_anomalies(fd, tail)
            pending += records
            for r in pending:
                entry = canonical({"seq": count + 1, "ts": round(time.time(), 3), **r, "prev": prev, "mac_key": kid})
                entry["hash"] = seal(entry, key)
                self._write_line(fd, json.dumps(entry, sort_keys=True).encode() + b"\n")
                count, prev = count + 1, entry["hash"]
                written.append(entry)
            if written or not self.head_path.exists():
                os.fsync(fd)
                replace_file_durably(self.head_path, json.dumps({"count": count, "hash": prev}).encode() + b"\n")
            if written and self.witness is not None:
                self.witness(count, prev)
            return written
        finally:
            os.close(fd)  # releases the lock

    def _write_line(self, fd: int, line: bytes) -> None:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.ftruncate(fd, size)  # no torn line of our own left behind
            raise

    def _move_torn_tail(self, fd: int, end: int) -> dict[str, Any] | None:
        """Move the bytes after ``end``, the last newline (a write cut short), into ``audit.jsonl.torn-<time>``."""
        size = os.fstat(fd).st_size
        if end == size:
            return None
        torn = os.pread(fd, size - end, end)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in range(1000):
            aside = self.path.with_name(f"{self.path.name}.torn-{stamp}" + (f"-{n}" if n else ""))
            try:
                write_new_file(aside, torn)
                break
            except FileExistsError:
                continue
        else:
            raise AuditError(f"cannot find a free name for the torn tail of {self.path} beside it")
        os.ftruncate(fd, end)
        os.fsync(fd)
        fsync_directory(self.path.parent)
        return {
            "torn_bytes": len(torn),
            "torn_sha256": hashlib.sha256(torn).hexdigest(),
            "moved_to": aside.name,
            "at_offset": end,
        }

    def _tail(self, fd: int) -> _Tail:
        end = complete_end(fd, os.fstat(fd).st_size)
        for _start, line in lines_backwards(fd, end):
            if not line.strip():
                continue
            try:
                last = json.loads(line)
                if not isinstance(last, dict) or not isinstance(last.get("hash"), str):
                    raise ValueError
            except ValueError as e:
                raise AuditError(
                    f"the last line of {self.path} is not an audit record, so nothing can be chained to it; "
                    f"run `loraforge audit verify`, then move the log and {self.head_path.name} aside "
                    "(kept as evidence) to start a new log"
                ) from e
            if isinstance(last.get("seq"), int):
                return _Tail(last["seq"], last, end)
            # an unkeyed log from before numbering: count its lines once; the next record is numbered
            count = sum(1 for _ in lines_backwards(fd, end))
            return _Tail(count, last, end)
        return _Tail(0, None, end)

    def _head_anomalies(self, fd: int, tail: _Tail) -> list[dict[str, Any]]:
        """Records to append when the head disagrees with the log (a log cut short, a head removed)."""
        head = read_head(self.head_path)
        event = {"actor": "audit", "target": self.path.name}
        numbered = tail.last is not None and "seq" in tail.last
        if head is None:
            if numbered:  # a log this module wrote always has a head
                return [{**event, "action": "audit.head_missing", "details": {"log_count": tail.count}}]
            return []
        count, hashed = head.get("count"), head.get("hash")
        if not isinstance(count, int) or not isinstance(hashed, str):
            return [{**event, "action": "audit.head_mismatch", "details": {"head": head, "log_count": tail.count}}]
        if count > tail.count:
            details = {"head_count": count, "head_hash": hashed, "log_count": tail.count}
            return [{**event, "action": "audit.truncated", "details": details}]
        if count == 0 or (tail.last is not None and tail.count == count and tail.last.get("hash") == hashed):
            return []
        # the head is behind (a crash between an append and the head's update): find its record
        for _start, line in lines_backwards(fd, tail.end):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("seq") == count and rec.get("hash") == hashed:
                    return []
                if isinstance(rec, dict) and isinstance(rec.get("seq"), int) and rec["seq"] <= count:
                    break
        details = {"head_count": count, "head_hash": hashed, "log_count": tail.count}
        return [{**event, "action": "audit.head_mismatch", "details": details}]


def verify_audit_log(path: Path, *, key_file: Path | None = None, witness: dict[str, Any] | None = None) -> list[str]:
    """Check the log at ``path`` against its chain, its key and its head; problems, each naming the line.

    Empty when intact. Reports: lines that are not JSON; records that do not follow the previous one
    (removed, inserted, reordered); content that does not match its hash or HMAC (edited, forged);
    records written with another key; unkeyed records after keyed ones; a torn last line; a log
    that ends before its head (its last records deleted) or disagrees with it; the anomaly records
    writers append (``audit.truncated`` …). Cannot detect a rollback of both log and head (see the
    module docstring).

    Args:
        path: ``HOME/audit.jsonl``; its head is ``HOME/audit.head``.
        key_file: the HMAC key (default :func:`default_key_file`); never created here.
        witness: ``{"count", "hash"}`` kept elsewhere (the registry's ``audit_heads``): a log and
            head both rolled back to an earlier state still end before it.
    """
    key_path = key_file or default_key_file()
    key = read_key(key_path)
    kid = key_id(key) if key is not None else None
    problems: list[str] = []
    if not path.is_file():
        head = read_head(head_path(path))
        if head and head.get("count"):
            problems.append(f"{path}: missing, but its head {head_path(path)} records {head['count']} entries")
        return problems
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # no half-written line of a live writer, and a head that matches the log
        data = f.read()
        head = read_head(head_path(path))
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    prev, last_seq, keyed, unchecked, hashes = GENESIS, 0, False, 0, {}
    for number, raw in enumerate(lines, 1):
        where = f"{path}:{number}"
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError
        except ValueError:
            problems.append(f"{where}: not a JSON record")
            last_seq += 1
            continue
        seq = entry.get("seq")
        if seq is None:
            seq = last_seq + 1
            if keyed:
                problems.append(f"{where}: an unkeyed record after keyed ones (forged, or written by an old version)")
        if entry.get("prev") != prev:
            if isinstance(seq, int) and seq > last_seq + 1:
                gap = f"{last_seq + 1}" if seq == last_seq + 2 else f"{last_seq + 1}–{seq - 1}"
                problems.append(f"{where}: does not follow the previous record: record(s) {gap} were removed")
            else:
                problems.append(f"{where}: does not follow the previous record (removed, inserted or reordered lines)")
        elif seq != last_seq + 1:
            problems.append(f"{where}: numbered {seq} after record {last_seq} (renumbered)")
        body = {k: v for k, v in entry.items() if k != "hash"}
        if "mac_key" in entry:
            keyed = True
            if key is None:
                unchecked += 1
            elif entry["mac_key"] != kid:
                problems.append(
                    f"{where}: written with audit key id {entry['mac_key']}, but {key_path} has id {kid}; "
                    f"set {KEY_ENV} to the key its writer used"
                )
            elif not hmac.compare_digest(seal(body, key).encode(), str(entry.get("hash")).encode()):
                problems.append(f"{where}: content does not match its HMAC (edited, or written without the key)")
        elif "seq" in entry:
            problems.append(f"{where}: numbered but not keyed (forged: every numbered record carries an HMAC)")
        elif seal(body, None) != entry.get("hash"):
            problems.append(f"{where}: content does not match its hash (edited)")
        if entry.get("action") in ANOMALIES:
            problems.append(f"{where}: {_anomaly_text(entry)}")
        prev, last_seq = str(entry.get("hash", "")), seq if isinstance(seq, int) else last_seq + 1
        hashes[last_seq] = prev
    if lines and not keyed:
        problems.append(
            f"{path}: none of its {len(lines)} records is keyed (a log from before the audit key): anyone who can "
            "write it can recompute its plain sha256 chain; the next append keys it from then on"
        )
    if unchecked:
        problems.append(
            f"{path}: the HMACs of {unchecked} record(s) cannot be checked: the audit key {key_path} does not exist; "
            f"set {KEY_ENV} to the key file the writers use"
        )
    if torn:
        problems.append(
            f"{path}:{len(lines) + 1}: a torn last line ({len(torn)} bytes without a newline: a write cut short); "
            "the next append moves it aside and logs audit.repair"
        )
    problems += _check_head(path, head, last_seq, hashes, numbered=keyed)
    if witness is not None:
        problems += _check_head(path, witness, last_seq, hashes, numbered=False, where="the registry's audit head")
    return problems


def _check_head(
    path: Path,
    head: dict[str, Any] | None,
    count: int,
    hashes: dict[int, str],
    *,
    numbered: bool,
    where: str | None = None,
) -> list[str]:
    label = where or "its head"
    if head is None:
        return [f"{head_path(path)}: missing, but {path} has {count} numbered records (deleted?)"] if numbered else []
    hc, hh = head.get("count"), head.get("hash")
    if not isinstance(hc, int) or not isinstance(hh, str):
        return [f'{where or head_path(path)}: not a head record ({{"count": N, "hash": …}}): {head}']
    if hc > count:
        return [
            f"{path}: the log ends at record {count} but {label} records {hc} entries: "
            f"the last {hc - count} record(s) were deleted"
        ]
    if hc and hashes.get(hc) != hh:
        return [f"{path}: record {hc} does not have the hash {label} records ({hh[:16]}…): the log was rewritten"]
    return []


def _anomaly_text(entry: dict[str, Any]) -> str:
    d = entry.get("details") or {}
    if entry.get("action") == "audit.truncated":
        return (
            f"a writer found the log cut short: it ended at record {d.get('log_count')} "
            f"but its head recorded {d.get('head_count')} entries (records deleted before this one was written)"
        )
    if entry.get("action") == "audit.head_missing":
        return f"a writer found {HEAD_NAME} missing with {d.get('log_count')} records in the log (deleted?)"
    return f"a writer found {HEAD_NAME} not matching the log ({d}): the log or its head was rewritten"
