"""``loraforge serve``, ``loraforge keys …`` and ``loraforge adapters …``: the server and what it serves."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from loraforge.cli.options import SERVE_FLAGS, ConfigFlags, DatabaseUrl, Home, NoUpgrade, config_flags
from loraforge.cli.output import console, show_adapters, show_keys
from loraforge.errors import ConfigError
from loraforge.home import resolve_home

if TYPE_CHECKING:
    from loraforge.registry.database import Registry

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
adapters_app = typer.Typer(help="The adapters a server can serve: add, list, remove.", no_args_is_help=True)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@config_flags(SERVE_FLAGS)
def serve(
    config: Annotated[Path | None, typer.Option(help="Server YAML config (see docs/serving.md).")] = None,
    *,
    flags: ConfigFlags,
    worker: Annotated[
        bool, typer.Option("--worker", help="Also run a fine-tuning worker beside the server (one machine).")
    ] = False,
    no_upgrade: NoUpgrade = False,
    home: Home = None,
) -> None:
    """Serve the base model and the registered adapters behind an OpenAI-compatible API.

    Every option below can also be set in the --config file; a flag given here wins over the file.
    """
    import subprocess
    import sys

    from loraforge.serve.config import load_serve_config
    from loraforge.serve.server import run_server

    cfg = load_serve_config(config, {**flags, "upgrade_registry": False} if no_upgrade else flags)
    root = resolve_home(home)
    child = None
    if worker:  # a process of its own: training never competes with the server's engine thread for the GIL
        command = [sys.executable, "-m", "loraforge", "worker", "--home", str(root)]
        if cfg.database_url:
            command += ["--database-url", cfg.database_url]
        if not cfg.upgrade_registry:
            command += ["--no-upgrade"]
        child = subprocess.Popen(command)
    try:
        run_server(cfg, root)
    finally:
        if child is not None:
            child.terminate()  # a running job is taken back from its checkpoint by the next worker
            child.wait(timeout=30)


def _registry(home: Path, url: str | None) -> Registry:
    from loraforge.serve.home_registry import home_registry

    return home_registry(home, url)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    role: Annotated[
        str,
        typer.Option(
            help="user (or developer): models, files and jobs; approver: approves releases; "
            "auditor: reads reports and logs; admin: deploys and manages its tenant's adapters."
        ),
    ] = "user",
    all_tenants: Annotated[
        bool,
        typer.Option("--global", help="An admin, approver or auditor key for every tenant (and public adapters)."),
    ] = False,
    owner: Annotated[
        str | None,
        typer.Option(help="The person it belongs to (name or e-mail): nobody approves what they created."),
    ] = None,
    production: Annotated[
        bool, typer.Option("--production", help="A production key: it reaches deployed routes only.")
    ] = False,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from loraforge.govern.audit_witness import audit_log
    from loraforge.serve.keys import KeyStore

    h = resolve_home(home)
    environment = "production" if production else "development"
    intent = {"role": role, "all_tenants": all_tenants, "owner": owner, "environment": environment}
    registry = _registry(h, database_url)
    with audit_log(h, registry).action(_actor(), "key.create", f"tenant:{tenant}", **intent) as act:
        key, record = KeyStore(h, registry).create(
            tenant, role, all_tenants=all_tenants, owner=owner, environment=environment
        )
        act.outcome["key_id"] = record.id  # the id only: the key itself never enters the log
    console.print(key, highlight=False, soft_wrap=True)
    console.print(
        f"[dim]key id {record.id} · tenant {tenant} · role {role}{' (all tenants)' if all_tenants else ''}"
        f"{' · owner ' + owner if owner else ''} · {environment} — "
        "store it now: it cannot be shown again[/]",
        highlight=False,
    )


@keys_app.command("list")
def keys_list(database_url: DatabaseUrl = None, home: Home = None) -> None:
    """List keys (ids, tenants, roles; never the keys)."""
    from loraforge.serve.keys import KeyStore

    h = resolve_home(home)
    show_keys(console, KeyStore(h, _registry(h, database_url)).records())


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id shown by `keys list`.")],
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Revoke a key; a running server refuses it from its next request."""
    from loraforge.govern.audit_witness import audit_log
    from loraforge.serve.keys import KeyStore

    h = resolve_home(home)
    registry = _registry(h, database_url)
    with audit_log(h, registry).action(_actor(), "key.revoke", key_id) as act:
        record = KeyStore(h, registry).revoke(key_id)
        act.outcome["tenant"] = record.tenant
    console.print(f"revoked key {key_id} (tenant {record.tenant})")


@adapters_app.command("add")
def adapters_add(
    directory: Annotated[Path, typer.Argument(help="A trained adapter directory (from `loraforge train`).")],
    name: Annotated[str, typer.Option(help="The model name clients will use.")],
    tenant: Annotated[str | None, typer.Option(help="The tenant that owns it (only it can use it).")] = None,
    public: Annotated[bool, typer.Option("--public", help="Every tenant may use it.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an adapter of the same name.")] = False,
    override_governance: Annotated[
        str | None,
        typer.Option(
            help="Publish (--public) without a passed data-governance record; the reason is recorded and shown."
        ),
    ] = None,
    max_lora_rank: Annotated[int, typer.Option(help="Refuse adapters of a higher LoRA rank.")] = 64,
    max_size_mb: Annotated[int, typer.Option(help="Refuse adapter files larger than this.")] = 1024,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Register a trained adapter so the server can serve it under NAME.

    Only regular files are taken (no links or FIFOs), each under --max-size-mb, with both checksums
    of its manifest matching and finite weights of rank at most --max-lora-rank. Publishing it to
    every tenant (--public) needs a passed data-governance record (licences checked, personal data
    redacted or dropped, no exception taken) or --override-governance REASON.
    """
    from loraforge.govern.audit_witness import audit_log
    from loraforge.govern.release import creator
    from loraforge.serve.adapters import AdapterStore

    if public == (tenant is not None):
        raise ConfigError("give exactly one of --tenant NAME or --public")
    h = resolve_home(home)
    registry = _registry(h, database_url)
    store = AdapterStore(h, max_rank=max_lora_rank, max_bytes=max_size_mb * 2**20, registry=registry)
    intent = {"tenant": tenant, "public": public, "directory": str(directory), "override": override_governance}
    with audit_log(h, registry).action(_actor(), "adapter.add", name, **intent) as act:
        reg = store.add(
            directory,
            name,
            tenant=tenant,
            replace=replace,
            governance_override=override_governance,
            created_by=creator(None, _actor()),
        )
        act.outcome.update(
            sha256=reg.weights_sha256,
            source=reg.source,
            governance_flags=list(reg.governance_flags),
            governance_override=reg.governance_override,
        )
    owner = "public" if reg.public else f"tenant {reg.tenant}"
    console.print(
        f"registered [bold]{name}[/] ({owner}) on {reg.base_model}, weights sha256 {reg.weights_sha256[:12]}… "
        f"— state {reg.state}"
        + ("" if reg.state == "evaluated" else " (no evaluation in its manifest: run `loraforge eval` first)")
    )
    for flag in reg.governance_flags:
        console.print(f"[yellow]governance exception taken in training: {flag}[/]")
    if reg.governance_override:
        console.print(f"[yellow]published without a passed governance record: {reg.governance_override}[/]")


@adapters_app.command("list")
def adapters_list(database_url: DatabaseUrl = None, home: Home = None) -> None:
    """List registered adapters and their owners."""
    from loraforge.serve.adapters import AdapterStore

    h = resolve_home(home)
    show_adapters(console, AdapterStore(h, registry=_registry(h, database_url)).registrations())


@adapters_app.command("remove")
def adapters_remove(
    name: Annotated[str, typer.Argument(help="Adapter name.")], database_url: DatabaseUrl = None, home: Home = None
) -> None:
    """Unregister an adapter (its copy in the store is deleted)."""
    from loraforge.govern.audit_witness import audit_log
    from loraforge.serve.adapters import AdapterStore

    h = resolve_home(home)
    registry = _registry(h, database_url)
    with audit_log(h, registry).action(_actor(), "adapter.remove", name):
        if not AdapterStore(h, registry=registry).remove(name):
            raise ConfigError(f"no adapter named {name!r}; `loraforge adapters list` shows them")
    console.print(f"removed {name}")
