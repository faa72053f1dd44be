"""The ``loraforge`` command: a table of plain typed functions; each docstring is its ``--help``.

This package registers the commands; each group lives in its own module (``data``, ``train``,
``generate``, ``evaluate`` for ``eval``, ``serve`` for serve, keys and adapters, ``audit``, ``jobs`` for
the worker and the registry, ``client`` for ``files`` and ``jobs`` against a running server, ``export``,
``release`` for approve, reject, retire, deploy, rollback and ``release``, ``pilot`` for ``pilot``,
``monitor`` and ``adapters profile``, ``guard`` for the injection detector, ``review`` for the queue
of its blocks and flags), the
rendering in ``output`` and the options shared or generated from config dataclasses in ``options``.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from loraforge.cli import (
    audit,
    client,
    data,
    evaluate,
    export,
    generate,
    guard,
    jobs,
    pilot,
    release,
    review,
    serve,
    train,
)
from loraforge.cli.output import err_console
from loraforge.errors import LoraforgeError

app = typer.Typer(
    name="loraforge",
    help="Governed, evaluated LoRA fine-tuning on open models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data.data_app, name="data")
app.command("serve")(serve.serve)
app.add_typer(serve.keys_app, name="keys")
app.add_typer(serve.adapters_app, name="adapters")
app.add_typer(audit.audit_app, name="audit")
app.command("train")(train.train)
app.command("generate")(generate.generate)
app.command("eval")(evaluate.eval_adapter)
app.command("worker")(jobs.worker)
app.add_typer(jobs.registry_app, name="registry")
app.add_typer(client.files_app, name="files")
app.add_typer(client.jobs_app, name="jobs")
app.add_typer(export.export_app, name="export")
app.command("approve")(release.approve)
app.command("reject")(release.reject)
app.command("retire")(release.retire)
app.command("deploy")(release.deploy)
app.command("rollback")(release.rollback)
app.command("report")(release.report)
app.add_typer(release.release_app, name="release")
app.add_typer(pilot.pilot_app, name="pilot")
app.command("monitor")(pilot.monitor)
serve.adapters_app.command("profile")(pilot.adapter_profile)
app.add_typer(guard.guard_app, name="guard")
app.add_typer(review.review_app, name="review")


def main() -> None:
    """Entry point: run the app; a LoraforgeError becomes one clear line and exit status 1."""
    from loraforge.runtime import configure_process

    configure_process()
    try:
        app()
    except LoraforgeError as e:
        err_console.print(f"[red]error[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
