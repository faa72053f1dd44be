"""``loraforge data check``, ``data redact`` and ``data report``: datasets before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from loraforge.cli.options import Home
from loraforge.cli.output import (
    console,
    err_console,
    show_data_report,
    show_governance,
    show_licensing,
    show_redaction,
)
from loraforge.data.dedup import NEAR_DUPLICATE_THRESHOLD
from loraforge.errors import ConfigError, LoraforgeError

data_app = typer.Typer(help="Check datasets before training.", no_args_is_help=True)


def _writable_target(out: Path, kind: str) -> None:
    """Refuse an --out that cannot become a ``kind`` before any work is done."""
    if kind == "file" and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name")
    if kind == "directory" and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the path cannot be created")


def _optional_tokenizer(base_model: str, home: Path | None, consequence: str) -> Any:
    """The base model's tokenizer, or None with a warning (structure checks don't need it)."""
    from loraforge.home import model_cache_dir
    from loraforge.models.sources import DEFAULT_BASE_MODEL, load_tokenizer, resolve_base_model

    try:
        return load_tokenizer(resolve_base_model(base_model or DEFAULT_BASE_MODEL, model_cache_dir(home)))
    except LoraforgeError as e:
        err_console.print(f"[yellow]warning[/]: {consequence}: {escape(str(e))}")
        return None


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="Dataset file: .jsonl, .json or .csv.")],
    format: Annotated[str, typer.Option(help="auto, chat, alpaca, completion or csv.")] = "auto",
    columns: Annotated[
        str | None, typer.Option(help="CSV column mapping, e.g. user=question,assistant=answer.")
    ] = None,
    base_model: Annotated[str, typer.Option(help="Model whose tokenizer and template measure lengths.")] = "",
    context_length: Annotated[int, typer.Option(help="Longest example in tokens.")] = 1024,
    overlong: Annotated[str, typer.Option(help="truncate or drop examples over the context.")] = "truncate",
    manifest: Annotated[
        Path | None, typer.Option(help="Licence manifest (default: NAME.manifest.yaml beside it).")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="Licence policy YAML (default: the shipped one).")] = None,
    allow_unlicensed: Annotated[
        bool, typer.Option("--allow-unlicensed", help="Don't fail for a missing licence manifest.")
    ] = False,
    against: Annotated[
        Path | None, typer.Option(help="Evaluation/validation file to check for contamination (overlap).")
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="Near-duplicate similarity threshold (Jaccard).")
    ] = NEAR_DUPLICATE_THRESHOLD,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and problems as JSON.")] = False,
    home: Home = None,
) -> None:
    """Report every problem of a dataset at once (file:line: field: message); exit 1 if it cannot be trained on."""
    from loraforge.data.formats import FORMATS, parse_columns
    from loraforge.data.prepare import check_data

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"--overlong must be truncate or drop, got {overlong!r}")
    tokenizer = _optional_tokenizer(base_model, home, "token lengths not checked")
    checked = check_data(
        path,
        tokenizer,
        format=format,  # type: ignore[arg-type]
        columns=parse_columns(columns),
        max_length=context_length,
        overlong=overlong,  # type: ignore[arg-type]
        manifest=manifest,
        policy=policy,
        allow_unlicensed=allow_unlicensed,
        against=against,
        threshold=threshold,
    )
    report, licensing, governance = checked.report, checked.licensing, checked.governance
    if as_json:
        payload = {
            "ok": report.ok,
            "summary": report.summary(),
            "licensing": licensing.to_json() if licensing else None,
            "governance": governance,
            "problems": [vars(p) for p in report.problems],
        }
        console.print_json(json.dumps(payload))
    else:
        if licensing is not None:
            show_licensing(console, licensing)
        show_governance(console, governance)
        show_data_report(console, report)
    raise typer.Exit(0 if report.ok else 1)


@data_app.command("redact")
def data_redact(
    path: Annotated[Path, typer.Argument(help="Dataset file: .jsonl, .json or .csv.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the redacted dataset (chat JSONL).")],
    action: Annotated[str, typer.Option(help="redact (typed placeholders) or drop (leave examples out).")] = "redact",
    format: Annotated[str, typer.Option(help="auto, chat, alpaca, completion or csv.")] = "auto",
    columns: Annotated[str | None, typer.Option(help="CSV column mapping.")] = None,
) -> None:
    """Replace personal data and secrets with typed placeholders (<EMAIL_1>…), or drop those examples."""
    from loraforge.data.formats import load_dataset, parse_columns
    from loraforge.data.scan import example_to_chat, scan_examples
    from loraforge.files import write_text_atomic

    if action not in ("redact", "drop"):
        raise ConfigError(f"--action must be redact or drop, got {action!r}")
    if out.resolve() == path.resolve():
        raise ConfigError("--out must differ from the input: the original is never overwritten")
    _writable_target(out, "file")
    loaded = load_dataset(path, format, parse_columns(columns))  # type: ignore[arg-type]
    if loaded.errors:
        lines = "\n".join(str(p) for p in loaded.errors[:20])
        raise ConfigError(f"{path} has errors; fix them first (see `loraforge data check`):\n{lines}")
    kept, report = scan_examples(loaded.examples, action)  # type: ignore[arg-type]
    write_text_atomic(out, "".join(json.dumps(example_to_chat(ex), ensure_ascii=False) + "\n" for ex in kept))
    show_redaction(console, path, out, report, len(kept))


@data_app.command("report")
def data_report(
    path: Annotated[Path, typer.Argument(help="Dataset file: .jsonl, .json or .csv.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for datasheet.json and datasheet.html.")],
    format: Annotated[str, typer.Option(help="auto, chat, alpaca, completion or csv.")] = "auto",
    columns: Annotated[str | None, typer.Option(help="CSV column mapping.")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Licence manifest (default: beside the data).")] = None,
    policy: Annotated[Path | None, typer.Option(help="Licence policy YAML (default: the shipped one).")] = None,
    base_model: Annotated[str, typer.Option(help="Model whose tokenizer measures lengths.")] = "",
    home: Home = None,
) -> None:
    """Write a datasheet (Datasheets for Datasets sections) as JSON and HTML; unknown answers are marked."""
    from loraforge.data.datasheet import build_datasheet, write_datasheet
    from loraforge.data.formats import parse_columns
    from loraforge.data.licensing import LicenseError, check_licensing
    from loraforge.data.scan import scan_examples
    from loraforge.data.validate import check_dataset

    _writable_target(out, "directory")
    tokenizer = _optional_tokenizer(base_model, home, "token statistics left out")
    report = check_dataset(path, tokenizer, format=format, columns=parse_columns(columns))  # type: ignore[arg-type]
    if not report.examples:
        lines = "\n".join(str(p) for p in report.errors[:20])
        raise ConfigError(f"{path} has no readable example:\n{lines}")
    try:
        licensing = check_licensing([(path, report.examples)], manifest=manifest, policy=policy)
    except LicenseError as e:
        err_console.print(f"[yellow]warning[/]: licence section left for the owner: {escape(str(e))}")
        licensing = None
    _, scan = scan_examples(report.examples, "report")
    json_path, html_path = write_datasheet(build_datasheet(report, licensing, scan), out)
    console.print(f"datasheet: {html_path}\n           {json_path}")
