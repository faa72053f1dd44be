"""The audit log: tampering detected (edits, removals, a cut-off end), torn lines repaired, intents
logged before actions, concurrent writers, file modes, and appends that read only the tail."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.errors import AuditError
from loraforge.govern.audit import GENESIS, AuditLog, verify_audit_log

Tamper = Callable[[AuditLog], None]


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def _write(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("".join(line + "\n" for line in lines))


def _edit(n: int) -> Tamper:
    def tamper(log: AuditLog) -> None:
        lines = _lines(log)
        entry = json.loads(lines[n - 1])
        entry["target"] = "someone-else"
        lines[n - 1] = json.dumps(entry, sort_keys=True)
        _write(log, lines)

    return tamper


def _reseal(n: int, seal: Callable[[bytes], str]) -> Tamper:
    """Edit record n, then recompute every hash from it on and the head, as an attacker would."""

    def tamper(log: AuditLog) -> None:
        entries = [json.loads(line) for line in _lines(log)]
        entries[n - 1]["target"] = "someone-else"
        prev = entries[n - 2]["hash"] if n > 1 else GENESIS
        for e in entries[n - 1 :]:
            e["prev"] = prev
            e["hash"] = prev = seal(json.dumps({k: v for k, v in e.items() if k != "hash"}, sort_keys=True).encode())
        _write(log, [json.dumps(e, sort_keys=True) for e in entries])
        log.head_path.write_text(json.dumps({"count": len(entries), "hash": prev}))

    return tamper


def _delete(*numbers: int) -> Tamper:
    def tamper(log: AuditLog) -> None:
        _write(log, [line for i, line in enumerate(_lines(log), 1) if i not in numbers])

    return tamper


def _delete_last(k: int, *, head: bool = False) -> Tamper:
    def tamper(log: AuditLog) -> None:
        _write(log, _lines(log)[:-k])
        if head:
            log.head_path.unlink()

    return tamper


def _swap(a: int, b: int) -> Tamper:
    def tamper(log: AuditLog) -> None:
        lines = _lines(log)
        lines[a - 1], lines[b - 1] = lines[b - 1], lines[a - 1]
        _write(log, lines)

    return tamper


def _forge_append(log: AuditLog) -> None:
    last = json.loads(_lines(log)[-1])
    fake = {**last, "seq": last["seq"] + 1, "prev": last["hash"], "action": "key.revoke", "target": "k9"}
    fake["hash"] = hmac.new(b"a guessed key" * 3, json.dumps(fake).encode(), hashlib.sha256).hexdigest()
    _write(log, [*_lines(log), json.dumps(fake, sort_keys=True)])
    log.head_path.write_text(json.dumps({"count": fake["seq"], "hash": fake["hash"]}))


def _strip_keys(log: AuditLog) -> None:
    """Rewrite the whole log in the unkeyed pre-key format (plain sha256, no numbers) and drop the head."""
    entries, prev, out = [json.loads(line) for line in _lines(log)], GENESIS, []
    for e in entries:
        plain = {k: v for k, v in e.items() if k not in ("hash", "seq", "mac_key")} | {"prev": prev}
        plain["hash"] = prev = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
        out.append(json.dumps(plain, sort_keys=True))
    _write(log, out)
    log.head_path.unlink()


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


TAMPER_CASES: list[tuple[str, Tamper, str]] = [
    ("edit a record", _edit(2), ":2: content does not match its HMAC"),
    ("edit, re-chain with sha256, fix the head", _reseal(2, _sha256), ":2: content does not match its HMAC"),
    (
        "edit, re-chain with a guessed key",
        _reseal(3, lambda b: hmac.new(b"x" * 32, b, hashlib.sha256).hexdigest()),
        ":3: content does not match its HMAC",
    ),
    ("delete a middle record", _delete(3), ":3: does not follow the previous record: record(s) 3 were removed"),
    ("delete two middle records", _delete(2, 3), ":2: does not follow the previous record: record(s) 2–3 were removed"),
    ("reorder two records", _swap(2, 3), ":2: does not follow the previous record"),
    ("delete the last record", _delete_last(1), "the log ends at record 4 but its head records 5 entries"),
    ("delete the last 3 records", _delete_last(3), "ends at record 2 but its head records 5 entries: the last 3"),
    ("delete the last records and the head", _delete_last(2, head=True), "audit.head: missing, but"),
    ("append a forged record", _forge_append, ":6: content does not match its HMAC"),
    ("rewrite it unkeyed, drop the head", _strip_keys, "none of its 5 records is keyed"),
]


@pytest.mark.parametrize(("name", "tamper", "needle"), TAMPER_CASES, ids=[c[0] for c in TAMPER_CASES])
def test_tampering_is_detected(tmp_path: Path, name: str, tamper: Tamper, needle: str) -> None:
    log = AuditLog(tmp_path)
    for i in range(5):
        log.record("cli:test", "key.create", f"k{i}", tenant="t")
    assert verify_audit_log(log.path) == []
    tamper(log)
    problems = verify_audit_log(log.path)
    assert any(needle in p for p in problems), problems


def test_a_cut_off_end_stays_reported_after_the_next_append(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    for i in range(5):
        log.record("cli:test", "key.create", f"k{i}")
    _delete_last(2)(log)
    log.record("cli:test", "key.revoke", "k0")  # the writer notices before chaining onto the shorter log
    problems = verify_audit_log(log.path)
    assert any(":4: a writer found the log cut short: it ended at record 3" in p for p in problems), problems
    assert [e["action"] for e in log.entries()][-2:] == ["audit.truncated", "key.revoke"]


TORN_TAILS = [
    ("partial JSON", b'{"seq": 4, "ts": 17'),
    ("a whole record cut before its newline", None),
    ("one byte", b"{"),
]


@pytest.mark.parametrize(("name", "torn"), TORN_TAILS, ids=[c[0] for c in TORN_TAILS])
@pytest.mark.parametrize("how", ["append", "repair"])
def test_a_torn_last_line_is_moved_aside_and_the_repair_logged(
    tmp_path: Path, name: str, torn: bytes | None, how: str
) -> None:
    log = AuditLog(tmp_path)
    for i in range(3):
        log.record("cli:test", "adapter.add", f"a{i}")
    complete = 3
    if torn is None:  # a record whose write stopped just before the newline (the head not yet updated)
        lines = _lines(log)
        torn, complete = lines.pop().encode(), 2
        _write(log, lines)
        log.head_path.write_text(json.dumps({"count": 2, "hash": json.loads(lines[-1])["hash"]}))
    with open(log.path, "ab") as f:
        f.write(torn)
    assert any(f":{complete + 1}: a torn last line" in p for p in verify_audit_log(log.path))
    assert len(log.entries()) == complete  # readers skip it

    log.record("cli:test", "adapter.remove", "a0") if how == "append" else log.repair()

    (aside,) = tmp_path.glob("audit.jsonl.torn-*")
    assert aside.read_bytes() == torn and stat.S_IMODE(aside.stat().st_mode) == 0o600
    repair = next(e for e in log.entries() if e["action"] == "audit.repair")
    assert repair["details"]["moved_to"] == aside.name
    assert repair["details"]["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert log.path.read_bytes().endswith(b"\n")
    assert verify_audit_log(log.path) == []


class Boom(Exception):
    pass


ACTION_CASES: list[tuple[str, BaseException | None, str, str]] = [
    ("the action succeeds", None, "done", ""),
    ("the action raises", Boom("the store is full"), "failed", "Boom: the store is full"),
    ("the action is interrupted", KeyboardInterrupt(), "failed", "KeyboardInterrupt"),
]


@pytest.mark.parametrize(("name", "error", "phase", "text"), ACTION_CASES, ids=[c[0] for c in ACTION_CASES])
def test_the_intent_is_logged_before_the_action(
    tmp_path: Path, name: str, error: BaseException | None, phase: str, text: str
) -> None:
    log = AuditLog(tmp_path)
    seen_during: list[dict[str, object]] = []

    def run() -> None:
        with log.action("cli:ana", "adapter.add", "support", tenant="acme") as act:
            seen_during.extend(log.entries())  # what an auditor would find if the process died here
            act.outcome["sha256"] = "abc"
            if error is not None:
                raise error

    if error is None:
        run()
    else:
        with pytest.raises(type(error)):
            run()
    (during,) = seen_during
    assert during["phase"] == "intent" and during["details"] == {"tenant": "acme"}
    intent, outcome = log.entries()
    assert intent == during
    assert outcome["phase"] == phase and outcome["intent"] == intent["seq"]
    assert outcome["details"] == {"sha256": "abc"} and outcome.get("error", "") == text
    assert verify_audit_log(log.path) == []


def test_an_action_does_not_run_when_its_intent_cannot_be_logged(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k" * 64)
    key.chmod(0o644)  # readable by everyone: refused
    ran = []
    log = AuditLog(tmp_path / "home", key_file=key)
    with (
        pytest.raises(AuditError, match=r"accessible to other users .*chmod 600"),
        log.action("cli:a", "key.revoke", "k"),
    ):
        ran.append(True)
    assert ran == []


def test_another_key_is_refused_and_reported(tmp_path: Path) -> None:
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    AuditLog(tmp_path / "home", key_file=first).record("cli:ana", "key.create", "k1")
    with pytest.raises(AuditError, match="LORAFORGE_AUDIT_KEY_FILE"):
        AuditLog(tmp_path / "home", key_file=second).record("cli:bob", "key.create", "k2")
    second.write_text("z" * 64)
    second.chmod(0o600)
    assert any(
        ":1: written with audit key id" in p
        for p in verify_audit_log(tmp_path / "home" / "audit.jsonl", key_file=second)
    )
    missing = verify_audit_log(tmp_path / "home" / "audit.jsonl", key_file=tmp_path / "none.key")
    assert any("cannot be checked: the audit key" in p for p in missing), missing


def test_an_unkeyed_log_from_before_the_key_is_continued_and_protected(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    old, prev = [], GENESIS
    for i in range(3):  # the format this module wrote before it had a key, a number and a head
        e = {"ts": 1.0 + i, "actor": "cli", "action": "key.create", "target": f"k{i}", "details": {}, "prev": prev}
        e["hash"] = prev = hashlib.sha256(json.dumps(e, sort_keys=True).encode()).hexdigest()
        old.append(json.dumps(e, sort_keys=True))
    _write(log, old)
    assert any("none of its 3 records is keyed" in p for p in verify_audit_log(log.path))
    log.record("cli:ana", "key.revoke", "k0")
    assert log.entries()[-1]["seq"] == 4 and log.entries()[-1]["prev"] == prev
    assert verify_audit_log(log.path) == []
    _reseal(1, _sha256)(log)  # re-chaining the old part breaks the keyed record that covers it
    assert any(":4: does not follow the previous record" in p or ":4: content" in p for p in verify_audit_log(log.path))


def _append_many(home: str, worker: int, n: int) -> None:
    log = AuditLog(Path(home))
    for i in range(n):
        log.record(f"worker:{worker}", "adapter.load", f"a{i}")


def test_concurrent_writers_keep_one_valid_chain(tmp_path: Path) -> None:
    workers, each = 4, 15
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, each)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    entries = AuditLog(tmp_path).entries()
    assert [e["seq"] for e in entries] == list(range(1, workers * each + 1))
    for w in range(workers):  # each writer's records in its own order
        assert [e["target"] for e in entries if e["actor"] == f"worker:{w}"] == [f"a{i}" for i in range(each)]
    assert verify_audit_log(tmp_path / "audit.jsonl") == []
    assert json.loads((tmp_path / "audit.head").read_text())["count"] == workers * each


def test_files_are_0600_and_new_directories_0700_whatever_the_umask(tmp_path: Path) -> None:
    home, key = tmp_path / "new" / "home", tmp_path / "config" / "loraforge" / "audit.key"
    old = os.umask(0)
    try:
        log = AuditLog(home, key_file=key)
        log.record("cli:ana", "key.create", "k1")
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert {p.name: mode(p) for p in (log.path, log.head_path, key)} == {
        "audit.jsonl": 0o600,
        "audit.head": 0o600,
        "audit.key": 0o600,
    }
    assert {mode(d) for d in (home, home.parent, key.parent, key.parent.parent)} == {0o700}
    assert sorted(p.name for p in home.iterdir()) == ["audit.head", "audit.jsonl"]  # no temporary left


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_an_append_reads_the_tail_not_the_whole_log(tmp_path: Path) -> None:
    """Bytes read by this process (the kernel's count) for one append stay small as the log grows."""
    log = AuditLog(tmp_path)
    costs, sizes = [], []
    for _ in range(2):
        for _ in range(4):
            log.record("cli:test", "adapter.add", "big", blob="x" * 250_000)  # 1 MB more per round
        log.record("cli:test", "adapter.add", "small")  # the tail an append reads
        sizes.append(log.path.stat().st_size)
        before = _bytes_read()
        log.record("cli:test", "adapter.remove", "small")
        costs.append(_bytes_read() - before)
    assert sizes[0] > 1_000_000 and sizes[1] > 2_000_000
    assert max(costs) < 32_768, costs  # a whole-file read would be > 1 MB
    assert costs[1] <= costs[0] + 1024, costs
    assert verify_audit_log(log.path) == []


def test_cli_verify_and_keys_create_never_log_the_key(tmp_path: Path) -> None:
    from loraforge.cli import app

    runner = CliRunner()
    home = tmp_path / "home"
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--home", str(home)])
    assert created.exit_code == 0, created.output
    key = created.output.split()[0]
    text = (home / "audit.jsonl").read_text()
    assert key.startswith("lf-") and key not in text and key[3:] not in text
    intent, done = AuditLog(home).entries()
    assert (intent["action"], intent["phase"], done["phase"]) == ("key.create", "intent", "done")
    assert done["details"]["key_id"] in created.output

    ok = runner.invoke(app, ["audit", "verify", "--home", str(home)])
    assert ok.exit_code == 0 and "intact, 2 records" in ok.output, ok.output
    lines = (home / "audit.jsonl").read_text().splitlines()
    (home / "audit.jsonl").write_text(lines[0] + "\n")
    bad = runner.invoke(app, ["audit", "verify", "--home", str(home)])
    assert bad.exit_code == 1 and "the log ends at record 1 but its head records 2 entries" in bad.output
