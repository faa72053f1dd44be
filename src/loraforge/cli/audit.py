"""``loraforge audit verify|export``: the audit log of admin actions, checked and exported."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from loraforge.cli.options import DatabaseUrl, Home
from loraforge.cli.output import console, err_console
from loraforge.errors import ConfigError

audit_app = typer.Typer(help="The audit log of admin actions.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(database_url: DatabaseUrl = None, home: Home = None) -> None:
    """Check HOME/audit.jsonl against its chain, its key ($LORAFORGE_AUDIT_KEY_FILE), its head and the
    registry's copy of the head; exit 1 if broken."""
    from loraforge.govern.audit import AuditLog, head_path, read_head, verify_audit_log
    from loraforge.govern.audit_witness import RegistryWitness
    from loraforge.home import resolve_home
    from loraforge.serve.home_registry import home_registry

    h = resolve_home(home)
    log = AuditLog(h)
    witness = RegistryWitness(home_registry(h, database_url), log.path).head()
    problems = verify_audit_log(log.path, key_file=log.key_file, witness=witness)
    for problem in problems:
        err_console.print(f"[red]✗[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    head = read_head(head_path(log.path)) or {"count": 0, "hash": "-"}
    seen = f"the registry saw record {witness['count']}" if witness else "the registry has no copy of the head yet"
    console.print(
        f"{log.path}: intact, {len(log.entries())} records; head: record {head['count']}, hash {head['hash']} "
        f"(key {log.key_file}); {seen}. Keep this head "
        "somewhere the log's writers cannot change: only a copy outside the home reveals a rollback of both files.",
        highlight=False,
        soft_wrap=True,
    )


def parse_since(text: str) -> float:
    """``2026-12-01``, ``2026-12-01T08:00:00`` (UTC unless it names a zone) or UNIX seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise ConfigError(
            f"--since {text!r}: give a date (2026-12-01), a time (2026-12-01T08:00:00) or UNIX seconds"
        ) from e
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@audit_app.command("export")
def audit_export(
    since: Annotated[
        str | None, typer.Option(help="Only records from this time on (a date, an ISO time or UNIX seconds).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write JSONL here (atomically) instead of to standard output.")
    ] = None,
    home: Home = None,
) -> None:
    """Write the audit records as JSON lines, for a SIEM: each with its seq, time, actor, action, target,
    phase, details and its chain fields (prev, hash), so the receiver can check the chain too."""
    from loraforge.files import write_text_atomic
    from loraforge.govern.audit import AuditLog
    from loraforge.home import resolve_home

    start = parse_since(since) if since else None
    entries = [e for e in AuditLog(resolve_home(home)).entries() if start is None or float(e.get("ts", 0)) >= start]
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    if out is None:
        sys.stdout.write(text)
        return
    write_text_atomic(out, text)
    err_console.print(f"wrote {len(entries)} record(s) to {out}", highlight=False)
