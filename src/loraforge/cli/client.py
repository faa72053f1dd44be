"""``loraforge files`` and ``loraforge jobs``: a running server's files and fine-tuning API from the
shell, called the way the ``openai`` SDK calls it (the same paths, fields, pagination and errors).

The server is ``--url`` (default ``$LORAFORGE_URL``, else http://127.0.0.1:8000) and the key
``--key`` (default ``$LORAFORGE_API_KEY``). ``jobs create --follow`` and ``jobs events --follow``
show a job as ``loraforge train`` shows a run: a progress bar with the loss, the events as they come.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from loraforge.cli.output import console, err_console
from loraforge.errors import ConfigError, RemoteError

files_app = typer.Typer(help="Training files on a running server (the OpenAI files API).", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs on a running server (the OpenAI fine-tuning API).", no_args_is_help=True)

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL = ("succeeded", "failed", "cancelled")

Url = Annotated[str, typer.Option("--url", envvar="LORAFORGE_URL", help="The server's address.")]
Key = Annotated[
    str | None,
    typer.Option("--key", envvar="LORAFORGE_API_KEY", help="An API key (`loraforge keys create`)."),
]
License = Annotated[
    str | None, typer.Option("--license", help="The data's licence: an SPDX id or LicenseRef-… (sent with uploads).")
]
Owner = Annotated[str | None, typer.Option(help="Who owns the data (sent with uploads).")]
PersonalData = Annotated[
    bool | None,
    typer.Option("--personal-data/--no-personal-data", help="Whether the data holds personal data (with uploads)."),
]


class Client:
    """The server's ``/v1`` API over HTTP; a refusal becomes a :class:`RemoteError` with its message."""

    def __init__(self, url: str, key: str | None, *, timeout: float = 120.0) -> None:
        if not key:
            raise ConfigError("no API key: pass --key or set LORAFORGE_API_KEY (`loraforge keys create` makes one)")
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise RemoteError(
                f"cannot reach the server at {self.url} ({e}); is `loraforge serve` running there? "
                "(--url or LORAFORGE_URL names another)"
            ) from e
        if r.status_code >= 400:
            message, param = r.text.strip()[:500] or r.reason_phrase, None
            try:
                error = r.json()["error"]
                message, param = str(error["message"]), error.get("param")
            except (ValueError, KeyError, TypeError):
                pass
            where = f" (field {param})" if param else ""
            raise RemoteError(
                f"the server answered {r.status_code}: {message}{where}", status=r.status_code, param=param
            )
        return r.json()

    def pages(self, path: str, *, limit: int, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` items of a paginated list, following ``after`` from page to page."""
        items: list[dict[str, Any]] = []
        after: str | None = None
        while len(items) < limit:
            query = {**(params or {}), "limit": min(100, limit - len(items))}
            if after:
                query["after"] = after
            page = self.call("GET", path, params=query)
            items += page["data"]
            if not page.get("has_more") or not page["data"]:
                break
            after = page["data"][-1]["id"]
        return items

    def upload(
        self, path: Path, *, license: str | None, owner: str | None, personal_data: bool | None
    ) -> dict[str, Any]:
        """Upload ``path`` (``purpose=fine-tune``) with a progress bar; returns the file object."""
        if not path.is_file():
            raise ConfigError(f"{path} is not a file; give the JSONL file to upload")
        form: dict[str, str] = {"purpose": "fine-tune"}
        for name, value in (("license", license), ("owner", owner)):
            if value is not None:
                form[name] = value
        if personal_data is not None:
            form["personal_data"] = "true" if personal_data else "false"
        size = path.stat().st_size
        with (
            Progress(TextColumn("[bold]uploading"), BarColumn(), DownloadColumn(), console=err_console) as bar,
            path.open("rb") as raw,
        ):
            task = bar.add_task("upload", total=size)
            reader = _Counting(raw, lambda n: bar.advance(task, n))
            return dict(self.call("POST", "/files", data=form, files={"file": (path.name, reader)}))


class _Counting:
    """A binary file that reports how much has been read (httpx streams it in chunks)."""

    def __init__(self, raw: IO[bytes], advance: Any) -> None:
        self.raw, self.advance = raw, advance

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.advance(len(chunk))
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _when(ts: int | float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "—"


def _show_file(f: dict[str, Any]) -> None:
    status = f["status"]
    colour = {"processed": "green", "error": "red"}.get(status, "yellow")
    console.print(f"{f['id']}  {escape(f['filename'])}  {f['bytes']:,} bytes  [{colour}]{status}[/]", highlight=False)
    if f.get("status_details"):
        console.print(escape(str(f["status_details"])), style=colour, highlight=False, soft_wrap=True)


@files_app.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(help="A JSONL training file (the formats `loraforge data check` reads).")],
    license: License = None,
    owner: Owner = None,
    personal_data: PersonalData = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Upload a training file; the server checks it (format, licence, personal data, secrets).

    Exits 1 when the check fails, with the server's reason (a line number, the licence to declare…).
    Without --license/--owner/--personal-data the tenant's default declaration, if any, applies.
    """
    uploaded = Client(url, key).upload(path, license=license, owner=owner, personal_data=personal_data)
    _show_file(uploaded)
    if uploaded["status"] == "error":
        raise typer.Exit(1)


@files_app.command("list")
def files_list(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 100,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """List this tenant's files."""
    rows = Client(url, key).pages("/files", limit=limit)
    table = Table("id", "filename", "bytes", "status", "created")
    for f in rows:
        table.add_row(f["id"], escape(f["filename"]), f"{f['bytes']:,}", f["status"], _when(f["created_at"]))
    console.print(table if rows else "no files")


@files_app.command("delete")
def files_delete(
    file_id: Annotated[str, typer.Argument(help="The file's id (file-…).")], url: Url = DEFAULT_URL, key: Key = None
) -> None:
    """Delete a file (refused while a job still needs it)."""
    Client(url, key).call("DELETE", f"/files/{file_id}")
    console.print(f"deleted {file_id}")


def _auto(value: str | None, kind: type[int] | type[float], name: str) -> int | float | str | None:
    if value is None or value == "auto":
        return value
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"--{name} must be a number or auto, got {value!r}") from None


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ConfigError(f"--metadata takes KEY=VALUE, got {pair!r}")
        out[k] = v
    return out


@jobs_app.command("create")
def jobs_create(
    training_file: Annotated[str, typer.Option(help="A file id (file-…), or a local JSONL file to upload first.")],
    model: Annotated[str, typer.Option(help="The base model (as the server lists it in /v1/models).")],
    validation_file: Annotated[str | None, typer.Option(help="A file id or a local file, as above.")] = None,
    n_epochs: Annotated[str | None, typer.Option(help="Epochs, or auto.")] = None,
    batch_size: Annotated[str | None, typer.Option(help="Examples per step, or auto.")] = None,
    learning_rate_multiplier: Annotated[str | None, typer.Option(help="× loraforge's learning rate, or auto.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the model's name: ft:BASE:TENANT:SUFFIX:ID.")] = None,
    seed: Annotated[int | None, typer.Option(help="The seed of the run (same seed, same adapter).")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable: the job's metadata.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (loraforge extension).")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (loraforge extension).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (loraforge extension).")] = None,
    evaluate: Annotated[
        list[str] | None,
        typer.Option(help="An evaluation suite to run after training, repeatable (task, regression, safety…)."),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Show the job's progress until it ends.")] = True,
    license: License = None,
    owner: Owner = None,
    personal_data: PersonalData = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Create a fine-tuning job and (by default) follow it to its end, as `loraforge train` shows a run.

    Exits 1 if the job fails or is cancelled.
    """
    client = Client(url, key)

    def file_id(value: str) -> str:
        if Path(value).is_file():
            uploaded = client.upload(Path(value), license=license, owner=owner, personal_data=personal_data)
            _show_file(uploaded)
            if uploaded["status"] == "error":
                raise typer.Exit(1)
            return str(uploaded["id"])
        return value

    hyper = {
        name: v
        for name, v in (
            ("n_epochs", _auto(n_epochs, int, "n-epochs")),
            ("batch_size", _auto(batch_size, int, "batch-size")),
            ("learning_rate_multiplier", _auto(learning_rate_multiplier, float, "learning-rate-multiplier")),
        )
        if v is not None
    }
    extensions: dict[str, Any] = {
        name: v
        for name, v in (
            ("lora_r", lora_r),
            ("lora_alpha", lora_alpha),
            ("max_steps", max_steps),
            ("evaluate", evaluate),
        )
        if v
    }
    body: dict[str, Any] = {"model": model, "training_file": file_id(training_file)}
    if validation_file:
        body["validation_file"] = file_id(validation_file)
    if hyper:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    for name, value in (("suffix", suffix), ("seed", seed), ("metadata", _metadata(metadata))):
        if value is not None:
            body[name] = value
    if extensions:
        body["loraforge"] = extensions
    job = client.call("POST", "/fine_tuning/jobs", json=body)
    console.print(f"created {job['id']} ({job['status']})", highlight=False)
    if follow:
        _follow(client, job["id"])


def _show_job(job: dict[str, Any]) -> None:
    table = Table(show_header=False, title=job["id"], title_justify="left")
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(job["status"], "cyan")
    table.add_row("status", f"[{colour}]{job['status']}[/]")
    table.add_row("model", escape(job["model"]))
    table.add_row("training file", job["training_file"])
    if job.get("validation_file"):
        table.add_row("validation file", job["validation_file"])
    hyper = job.get("hyperparameters") or {}
    table.add_row("hyperparameters", escape(", ".join(f"{k}={v}" for k, v in hyper.items())))
    table.add_row("created", _when(job["created_at"]))
    if job.get("estimated_finish"):
        table.add_row("estimated finish", _when(job["estimated_finish"]))
    if job.get("finished_at"):
        table.add_row("finished", _when(job["finished_at"]))
    if job.get("trained_tokens"):
        table.add_row("trained tokens", f"{job['trained_tokens']:,}")
    if job.get("fine_tuned_model"):
        table.add_row("fine-tuned model", f"[bold]{escape(job['fine_tuned_model'])}[/]")
    evaluation = (job.get("loraforge") or {}).get("evaluation")
    if evaluation:
        table.add_row("release gate", str(evaluation["verdict"]))
    if job.get("result_files"):
        table.add_row("result files", ", ".join(job["result_files"]))
    if job.get("metadata"):
        table.add_row("metadata", escape(", ".join(f"{k}={v}" for k, v in job["metadata"].items())))
    if job.get("error"):
        error = job["error"]
        where = f" (field {error['param']})" if error.get("param") else ""
        table.add_row("error", f"[red]{escape(str(error.get('message')))}{escape(where)}[/]")
    console.print(table)


def _new_events(client: Client, job_id: str, seen: set[str]) -> list[dict[str, Any]]:
    """The job's events not in ``seen``, oldest first (the API lists them newest first)."""
    fresh: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["after"] = after
        page = client.call("GET", f"/fine_tuning/jobs/{job_id}/events", params=params)
        for event in page["data"]:
            if event["id"] in seen:
                return fresh[::-1]
            fresh.append(event)
        if not page.get("has_more") or not page["data"]:
            return fresh[::-1]
        after = page["data"][-1]["id"]


def _follow(client: Client, job_id: str, *, poll_s: float = 1.0) -> None:
    """Print events as they come, with a progress bar over the training steps; exit 1 unless it succeeds."""
    seen: set[str] = set()
    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
    )
    task = None
    with progress:
        while True:
            job = client.call("GET", f"/fine_tuning/jobs/{job_id}")
            for event in _new_events(client, job_id, seen):
                seen.add(event["id"])
                data = event.get("data") or {}
                if event.get("type") == "metrics" and data.get("total_steps"):
                    if task is None:
                        task = progress.add_task("train", total=data["total_steps"], loss="—")
                    loss = data.get("train_loss")
                    progress.update(task, completed=data["step"], loss=f"{loss:.4f}" if loss is not None else "—")
                    continue
                style = {"error": "red", "warn": "yellow"}.get(event.get("level", ""), "")
                progress.console.print(escape(event["message"]), style=style, highlight=False, soft_wrap=True)
            if job["status"] in FINAL:
                break
            time.sleep(poll_s)
    _show_job(job)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 20,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable: only jobs with it.")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """List this tenant's fine-tuning jobs."""
    params = {f"metadata[{k}]": v for k, v in (_metadata(metadata) or {}).items()}
    rows = Client(url, key).pages("/fine_tuning/jobs", limit=limit, params=params)
    table = Table("id", "status", "model", "fine-tuned model", "created")
    for j in rows:
        model = escape(j.get("fine_tuned_model") or "—")
        table.add_row(j["id"], j["status"], escape(j["model"]), model, _when(j["created_at"]))
    console.print(table if rows else "no fine-tuning jobs")


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="The job's id (ftjob-…).")], url: Url = DEFAULT_URL, key: Key = None
) -> None:
    """Show a job: status, hyperparameters, its model, the gate's verdict, its error."""
    _show_job(Client(url, key).call("GET", f"/fine_tuning/jobs/{job_id}"))


@jobs_app.command("events")
def jobs_events(
    job_id: Annotated[str, typer.Argument(help="The job's id (ftjob-…).")],
    follow: Annotated[bool, typer.Option("--follow", help="Keep showing new events until the job ends.")] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Print a job's events, oldest first (with --follow, until the job ends)."""
    client = Client(url, key)
    if follow:
        _follow(client, job_id)
        return
    for event in _new_events(client, job_id, set()):
        style = {"error": "red", "warn": "yellow"}.get(event.get("level", ""), "")
        console.print(f"[dim]{_when(event['created_at'])}[/] {escape(event['message'])}", style=style, highlight=False)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id (ftjob-…).")], url: Url = DEFAULT_URL, key: Key = None
) -> None:
    """Cancel a job: a queued one at once, a running one within seconds (its last checkpoint is kept)."""
    job = Client(url, key).call("POST", f"/fine_tuning/jobs/{job_id}/cancel")
    console.print(f"{job['id']}: {job['status']}", highlight=False)
