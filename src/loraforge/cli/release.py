"""``loraforge approve|reject|retire|deploy|rollback`` and ``loraforge release …``: the release steps.

Every step acts with an API key (``--key`` or ``$LORAFORGE_API_KEY``), looked up in the registry
like the server does: the same roles, the same separation of duties, the same audit records as the
admin endpoints. A step refused prints its reason and exits with status 1.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from loraforge.cli.options import DatabaseUrl, Home
from loraforge.cli.output import console
from loraforge.errors import ConfigError
from loraforge.home import resolve_home

if TYPE_CHECKING:
    from loraforge.govern.deploy import Deployments
    from loraforge.govern.release import Release
    from loraforge.serve.keys import KeyRecord

KEY_ENV = "LORAFORGE_API_KEY"

Key = Annotated[
    str | None,
    typer.Option(
        "--key", help=f"The API key acting (default: ${KEY_ENV}); its role decides what it may do.", show_default=False
    ),
]
Reason = Annotated[str, typer.Option(help="Why (recorded in the history and the audit log).")]
OptionalReason = Annotated[str | None, typer.Option(help="Why (recorded in the history and the audit log).")]

release_app = typer.Typer(help="Release records: an adapter's state and history, routes, the approval policy.")


def context(home: Path | None, url: str | None, key: str | None) -> tuple[KeyRecord, Release, Deployments]:
    from loraforge.govern.audit_witness import audit_log
    from loraforge.govern.deploy import Deployments
    from loraforge.govern.release import Release
    from loraforge.models.sources import DEFAULT_BASE_MODEL, PACKAGED_MODELS
    from loraforge.serve.home_registry import home_registry
    from loraforge.serve.keys import KeyStore

    secret = key or os.environ.get(KEY_ENV)
    if not secret:
        raise ConfigError(
            f"release steps act with an API key: pass --key KEY or set {KEY_ENV} "
            "(`loraforge keys create --role approver|admin --owner NAME` makes one)"
        )
    h = resolve_home(home)
    registry = home_registry(h, url)
    record = KeyStore(h, registry).authenticate(secret.strip())
    if record is None:
        raise ConfigError("the API key is unknown or revoked (`loraforge keys list` shows the active ones)")
    audit = audit_log(h, registry)
    reserved = {DEFAULT_BASE_MODEL, *PACKAGED_MODELS}
    return record, Release(registry, audit), Deployments(registry, audit, reserved=reserved)


def approve(
    adapter: Annotated[str, typer.Argument(help="The adapter's name.")],
    reason: OptionalReason = None,
    override: Annotated[
        str | None,
        typer.Option(help="Approve although its evaluation failed the release gate; the reason is shown with it."),
    ] = None,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Approve an evaluated adapter (an approver's key; never the key or person that created it)."""
    who, release, _ = context(home, database_url, key)
    step = release.approve(who, adapter, reason=reason, override=override)
    if step.state == "approved":
        console.print(f"[green]approved[/] {escape(adapter)} ({step.approvals} of {step.required} approvals)")
    else:
        console.print(
            f"approval {step.approvals} of {step.required} recorded for {escape(adapter)}; it stays {step.state}"
        )
    if step.override:
        console.print(f"[yellow]approved although the release gate did not pass: {escape(step.override)}[/]")


def reject(
    adapter: Annotated[str, typer.Argument(help="The adapter's name.")],
    reason: Reason,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Reject an evaluated or approved adapter: it goes back to draft, its approvals void."""
    who, release, _ = context(home, database_url, key)
    release.reject(who, adapter, reason=reason)
    console.print(f"rejected {escape(adapter)}: back to draft")


def retire(
    adapter: Annotated[str, typer.Argument(help="The adapter's name.")],
    reason: Reason,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Retire an adapter for good (an admin's key): it is never served or deployed again."""
    who, release, _ = context(home, database_url, key)
    release.retire(who, adapter, reason=reason)
    console.print(f"retired {escape(adapter)}")


def deploy(
    route: Annotated[str, typer.Argument(help="The model name clients call, such as support-bot.")],
    adapter: Annotated[str, typer.Argument(help="An approved adapter.")],
    reason: OptionalReason = None,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Serve an approved adapter under ROUTE (an admin's key); running servers switch at their next request."""
    who, _, deployments = context(home, database_url, key)
    binding = deployments.deploy(who, route, adapter, reason=reason)
    console.print(f"[green]deployed[/] {escape(adapter)} on route {escape(route)} (deployment {binding.deployment})")


def rollback(
    route: Annotated[str, typer.Argument(help="The route to roll back.")],
    reason: OptionalReason = None,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Restore the adapter ROUTE served before its current deployment (an admin's key), without a restart."""
    who, _, deployments = context(home, database_url, key)
    binding = deployments.rollback(who, route, reason=reason)
    console.print(f"rolled back {escape(route)}: it serves {escape(binding.adapter)} again")


@release_app.command("status")
def release_status(
    adapter: Annotated[str, typer.Argument(help="The adapter's name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """An adapter's state, approvals, verdict, routes and every step of its history."""
    who, release, _ = context(home, database_url, key)
    status = release.status(who, adapter)
    if as_json:
        console.print_json(json.dumps(status))
        return
    console.print(
        f"[bold]{escape(adapter)}[/]: {status['state']} · verdict {status['verdict'] or '-'} · "
        f"approvals {status['approvals']}/{status['approvals_required']} · routes {', '.join(status['routes']) or '-'}"
    )
    if status["release_override"]:
        console.print(
            f"[yellow]approved although the release gate did not pass: {escape(status['release_override'])}[/]"
        )
    table = Table("when", "step", "state", "by", "reason")
    for h in status["history"]:
        when = datetime.fromtimestamp(h["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        step = h["action"] + (" (override)" if h["override"] else "")
        table.add_row(when, step, f"{h['from_state'] or '-'} → {h['to_state']}", h["actor"], h["reason"] or "")
    console.print(table)


@release_app.command("routes")
def release_routes(key: Key = None, database_url: DatabaseUrl = None, home: Home = None) -> None:
    """The routes this key sees and the adapter each serves now."""
    from loraforge.govern.deploy import bindings
    from loraforge.govern.release import in_scope

    who, release, _ = context(home, database_url, key)
    table = Table("route", "owner", "adapter", "deployment")
    for b in bindings(release.registry):
        if in_scope(who, b.tenant):
            table.add_row(b.route, b.tenant or "public", b.adapter, str(b.deployment))
    console.print(table)


@release_app.command("policy")
def release_policy(
    approvals: Annotated[int, typer.Option(help="Distinct approvers an adapter needs (1 to 5).")],
    tenant: Annotated[str | None, typer.Option(help="The tenant (default: every tenant without its own).")] = None,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Require APPROVALS distinct approvers for a tenant's adapters (an admin's key)."""
    who, release, _ = context(home, database_url, key)
    release.set_policy(who, tenant, approvals)
    console.print(f"{tenant or 'every tenant'}: {approvals} approval(s) required")


def report(
    adapter: Annotated[str, typer.Argument(help="The adapter's name.")],
    out: Annotated[
        Path, typer.Option(help="The directory to write model_card.{html,json} and compliance.{html,json} into.")
    ],
    notes: Annotated[
        Path | None,
        typer.Option(
            help="YAML with what only the owner knows: intended_use, out_of_scope, users, factors, "
            "ethical_considerations, caveats (unknowns are marked for the owner otherwise)."
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Write the adapter's model card and compliance report (HTML and JSON), generated from the registry."""
    from loraforge.govern.audit_witness import RegistryWitness, audit_log
    from loraforge.govern.facts import gather
    from loraforge.govern.reports import read_notes, write_documents
    from loraforge.serve.home_registry import home_registry

    h = resolve_home(home)
    registry = home_registry(h, database_url)
    audit = audit_log(h, registry)
    facts = gather(registry, adapter, audit=audit, witness=RegistryWitness(registry, audit.path).head())
    written = write_documents(facts, out, read_notes(notes))
    for path in written:
        console.print(f"wrote {path}", highlight=False)
