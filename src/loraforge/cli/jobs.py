"""``loraforge worker`` runs fine-tuning jobs; ``loraforge registry`` looks after the registry database."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.exc import OperationalError

from loraforge.cli.options import DatabaseUrl, Home, NoUpgrade
from loraforge.cli.output import console, err_console
from loraforge.errors import ConfigError

registry_app = typer.Typer(help="The registry database: tenants, keys, files, jobs, adapters.", no_args_is_help=True)


def worker(
    max_jobs: Annotated[
        int | None, typer.Option(help="Stop after this many jobs (default: run until stopped).")
    ] = None,
    exit_when_idle: Annotated[bool, typer.Option("--exit-when-idle", help="Stop when no job is queued.")] = False,
    max_running_per_tenant: Annotated[
        int | None, typer.Option(help="Jobs of one tenant that may run at once across all workers.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for each training run.")] = None,
    heartbeat_timeout: Annotated[
        float, typer.Option(help="Seconds without a heartbeat after which a running job is taken back.")
    ] = 30.0,
    database_url: DatabaseUrl = None,
    no_upgrade: NoUpgrade = False,
    home: Home = None,
) -> None:
    """Claim queued fine-tuning jobs from the registry and run them, one at a time, until stopped.

    Any number of workers may share a registry; each job runs on exactly one. A job whose worker dies
    is resumed from its last checkpoint by another (or this one, restarted) after its heartbeat times out.
    """
    from loraforge.home import resolve_home
    from loraforge.jobs.executor import LocalExecutor
    from loraforge.jobs.worker import Worker, WorkerSettings
    from loraforge.serve.home_registry import home_registry

    root = resolve_home(home)
    registry = home_registry(root, database_url, upgrade_schema=not no_upgrade)
    stop = threading.Event()
    settings = WorkerSettings(max_running_per_tenant=max_running_per_tenant, stale_after_s=heartbeat_timeout)
    # SIGTERM (a supervisor, `serve --worker` ending): the running job goes back to the queue at once
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    runner = Worker(
        registry,
        root,
        LocalExecutor(root, threads=threads),
        settings=settings,
        log=lambda msg: err_console.print(msg, highlight=False),
    )
    console.print(
        f"worker {runner.name}: waiting for jobs in {registry.engine.url.render_as_string(hide_password=True)}"
    )
    try:
        done = runner.run(max_jobs=max_jobs, stop=stop, exit_when_idle=exit_when_idle)
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        registry.close()
    console.print(f"worker {runner.name}: {done} job(s) run")


@registry_app.command("upgrade")
def registry_upgrade(database_url: DatabaseUrl = None, home: Home = None) -> None:
    """Bring the registry's schema to this version's newest revision (the server and worker do it on start)."""
    from loraforge.home import resolve_home
    from loraforge.registry.database import current_revision
    from loraforge.serve.home_registry import home_registry

    registry = home_registry(resolve_home(home), database_url)
    try:
        console.print(
            f"registry {registry.engine.url.render_as_string(hide_password=True)}: "
            f"revision {current_revision(registry.engine)} (newest)"
        )
    finally:
        registry.close()


@registry_app.command("status")
def registry_status(database_url: DatabaseUrl = None, home: Home = None) -> None:
    """Say which schema revision the registry is at and whether it is current; exit 1 if it is behind."""
    from loraforge.home import resolve_home
    from loraforge.registry.database import current_revision, head_revision, make_engine
    from loraforge.registry.database import database_url as url_of

    engine = make_engine(url_of(resolve_home(home), database_url))
    shown = engine.url.render_as_string(hide_password=True)
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and not Path(database).is_file():
        err_console.print(
            f"registry {shown}: none yet; the server, a worker or `loraforge registry upgrade` creates it"
        )
        raise typer.Exit(1)
    try:
        current, head = current_revision(engine), head_revision(engine)
    except OperationalError as e:
        raise ConfigError(f"cannot open the registry {shown}: {e.orig}") from e
    finally:
        engine.dispose()
    shown = engine.url.render_as_string(hide_password=True)
    if current != head:
        err_console.print(
            f"registry {shown}: revision {current or 'none'}, behind {head}: run `loraforge registry upgrade`"
        )
        raise typer.Exit(1)
    console.print(f"registry {shown}: revision {current} (current)")
