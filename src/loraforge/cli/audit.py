"""``loraforge audit verify``: the audit log of admin actions, checked."""

from __future__ import annotations

import typer
from rich.markup import escape

from loraforge.cli.options import Home
from loraforge.cli.output import console, err_console

audit_app = typer.Typer(help="The audit log of admin actions.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(home: Home = None) -> None:
    """Check HOME/audit.jsonl against its chain, its key ($LORAFORGE_AUDIT_KEY_FILE) and its head; exit 1 if broken."""
    from loraforge.govern.audit import AuditLog, head_path, read_head, verify_audit_log
    from loraforge.home import resolve_home

    log = AuditLog(resolve_home(home))
    problems = verify_audit_log(log.path, key_file=log.key_file)
    for problem in problems:
        err_console.print(f"[red]✗[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    head = read_head(head_path(log.path)) or {"count": 0, "hash": "-"}
    console.print(
        f"{log.path}: intact, {len(log.entries())} records; head: record {head['count']}, hash {head['hash']} "
        f"(key {log.key_file}). Keep this head "
        "somewhere the log's writers cannot change: only a copy outside the home reveals a rollback of both files.",
        highlight=False,
        soft_wrap=True,
    )
