"""``loraforge review list|show|resolve``: the queue of requests a guard check blocked or flagged.

They act with an API key like the release steps (``--key`` or ``$LORAFORGE_API_KEY``): an admin's,
approver's or auditor's key reads its tenant's entries (a global key all of them); resolving one
needs an admin's key and a reason, and is audited.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraforge.cli.options import DatabaseUrl, Home
from loraforge.cli.output import console
from loraforge.cli.pilot import Json
from loraforge.cli.release import Key, Reason, context

review_app = typer.Typer(help="The review queue of guard blocks and flags.", no_args_is_help=True)


def _reviews(home: Path | None, url: str | None, key: str | None) -> tuple[Any, Any]:
    from loraforge.govern.review import Reviews

    who, release, _ = context(home, url, key)
    return who, Reviews(release.registry, release.audit)


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


@review_app.command("list")
def review_list(
    status: Annotated[str, typer.Option(help="open, resolved or all.")] = "open",
    tenant: Annotated[str | None, typer.Option(help="One tenant's entries (a global key).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="The newest entries.")] = 50,
    as_json: Json = False,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """The newest entries of the review queue, and how many are open and resolved."""
    who, reviews = _reviews(home, database_url, key)
    found = reviews.list(who, status=None if status == "all" else status, tenant=tenant, limit=limit)
    if as_json:
        print(json.dumps(found))
        return
    table = Table("id", "when", "tenant", "model", "check", "action", "score", "status", "excerpt")
    for r in found["data"]:
        table.add_row(
            str(r["id"]),
            _when(r["created_at"]),
            escape(r["tenant"]),
            escape(r["model"]),
            r["check"],
            r["action"],
            f"{r['score']:.2f}",
            r["status"] if r["status"] == "open" else f"{r['decision']}",
            escape(r["excerpt"][:60].replace("\n", " ")),
        )
    console.print(table)
    counts = found["counts"]
    console.print(f"{counts['open']} open, {counts['resolved']} resolved")


@review_app.command("show")
def review_show(
    review_id: Annotated[int, typer.Argument(help="The entry's id.")],
    as_json: Json = False,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """One entry: the request, the check and its score, and the message (personal data redacted)."""
    who, reviews = _reviews(home, database_url, key)
    r = reviews.get(who, review_id)
    if as_json:
        print(json.dumps(r))
        return
    console.print(
        f"review {r['id']} ({r['status']}): request {r['request_id']}, tenant {escape(r['tenant'])}, model "
        f"{escape(r['model'])}, key {r['key_id']}, {_when(r['created_at'])} UTC"
    )
    console.print(
        f"{r['check']} → {r['action']}: score {r['score']:.3f} ≥ {r['threshold']:.2f}, "
        f"message {r['message']} ({r['role']})"
    )
    console.print(escape(r["excerpt"]), highlight=False, soft_wrap=True)
    if r["status"] == "resolved":
        console.print(
            f"resolved: {r['decision']} by {escape(r['resolved_by'] or '')} at {_when(r['resolved_at'])} UTC: "
            f"{escape(r['reason'] or '')}"
        )


@review_app.command("resolve")
def review_resolve(
    review_id: Annotated[int, typer.Argument(help="The entry's id.")],
    decision: Annotated[str, typer.Option(help="attack, false_positive or unclear.")],
    reason: Reason,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Resolve an open entry with a decision and a reason (an admin's key; audited)."""
    who, reviews = _reviews(home, database_url, key)
    r = reviews.resolve(who, review_id, decision, reason)
    console.print(f"review {r['id']} resolved: {r['decision']}")
