"""The ``loraforge`` command: a table of plain typed functions; each docstring is its ``--help``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from loraforge import _cli_serve
from loraforge.errors import ConfigError, LoraforgeError

app = typer.Typer(
    name="loraforge",
    help="Governed, evaluated LoRA fine-tuning on open models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Check datasets before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.command("serve")(_cli_serve.serve)
app.add_typer(_cli_serve.keys_app, name="keys")
app.add_typer(_cli_serve.adapters_app, name="adapters")
audit_app = typer.Typer(help="The audit log of admin actions.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

console = Console()
err_console = Console(stderr=True)

Home = Annotated[
    Path | None, typer.Option("--home", help="State directory (default: $LORAFORGE_HOME or ~/.loraforge).")
]


def _cache(home: Path | None) -> Path:
    from loraforge.home import model_cache_dir

    return model_cache_dir(home)


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
    from loraforge.models.sources import DEFAULT_BASE_MODEL, load_tokenizer, resolve_base_model

    try:
        return load_tokenizer(resolve_base_model(base_model or DEFAULT_BASE_MODEL, _cache(home)))
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
    threshold: Annotated[float, typer.Option(help="Near-duplicate similarity threshold (Jaccard).")] = 0.8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and problems as JSON.")] = False,
    home: Home = None,
) -> None:
    """Report every problem of a dataset at once (file:line: field: message); exit 1 if it cannot be trained on."""
    from loraforge.data.formats import FORMATS, parse_columns
    from loraforge.data.fullcheck import governance_checks
    from loraforge.data.validate import check_dataset

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"--overlong must be truncate or drop, got {overlong!r}")
    tokenizer = _optional_tokenizer(base_model, home, "token lengths not checked")
    report = check_dataset(
        path,
        tokenizer,
        format=format,  # type: ignore[arg-type]
        columns=parse_columns(columns),
        max_length=context_length,
        overlong=overlong,  # type: ignore[arg-type]
    )
    licensing, governance = governance_checks(
        report,
        manifest=manifest,
        policy=policy,
        allow_unlicensed=allow_unlicensed,
        against=against,
        threshold=threshold,
    )
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
        from loraforge._cli_output import show_data_report, show_governance, show_licensing

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
    from rich.table import Table

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
    table = Table(title=escape(f"{path} → {out}"), title_justify="left")
    table.add_column("type")
    table.add_column("findings", justify="right")
    for kind, count in sorted({**report.pii_counts, **report.secret_counts}.items()):
        table.add_row(kind, str(count))
    console.print(table)
    console.print(
        f"{report.examples} examples: {report.redacted} redacted, {report.dropped} dropped, {len(kept)} written"
    )


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


@app.command()
def train(
    data: Annotated[str | None, typer.Option(help="Training dataset (JSONL, JSON or CSV).")] = None,
    output: Annotated[str | None, typer.Option(help="Directory for the adapter and its evidence.")] = None,
    validation: Annotated[str | None, typer.Option(help="Validation dataset (default: hold out 10%).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Packaged model name or local HF directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file; any option below can be set in it.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (instead of --epochs).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default: suggested).")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (scale = alpha / r).")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="Dropout on the LoRA input.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    format: Annotated[str | None, typer.Option(help="auto, chat, alpaca, completion or csv.")] = None,
    columns: Annotated[str | None, typer.Option(help="CSV column mapping.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, bf16 or fp32.")] = None,
    batch_rows: Annotated[int | None, typer.Option(help="Packed rows per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per packed row.")] = None,
    context_length: Annotated[int | None, typer.Option(help="Longest example in tokens (default: seq_len).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validation every N steps.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (0: never).")] = None,
    price_per_hour: Annotated[float | None, typer.Option(help="Machine price per hour for the cost.")] = None,
    manifest: Annotated[str | None, typer.Option(help="Licence manifest (default: beside the data).")] = None,
    policy: Annotated[str | None, typer.Option(help="Licence policy YAML (default: the shipped one).")] = None,
    allow_unlicensed: Annotated[
        bool, typer.Option("--allow-unlicensed", help="Train on data without a licence manifest (recorded).")
    ] = False,
    allow_secrets: Annotated[
        bool,
        typer.Option(
            "--allow-secrets", help="Train on API keys, tokens and private keys found in the data (recorded, flagged)."
        ),
    ] = False,
    pii: Annotated[
        str | None,
        typer.Option(help="Personal data: report, redact or drop (secrets are redacted unless --allow-secrets)."),
    ] = None,
    dedupe: Annotated[str | None, typer.Option(help="Remove duplicates: none, exact or near.")] = None,
    canaries: Annotated[int | None, typer.Option(help="Plant N canary secrets (memorization tests).")] = None,
    use_rslora: Annotated[bool, typer.Option("--use-rslora", help="Rank-stabilised LoRA scaling.")] = False,
    use_dora: Annotated[bool, typer.Option("--use-dora", help="Weight-decomposed LoRA (DoRA).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    home: Home = None,
) -> None:
    """Train a LoRA adapter; writes a PEFT directory with manifest.json, metrics.jsonl and loss.png."""
    from loraforge._cli_output import RichReporter
    from loraforge.train import load_config
    from loraforge.train import train as run_training

    if max_steps is not None and epochs is not None:
        raise ConfigError("give either --max-steps or --epochs, not both")
    overrides = {
        "data": data,
        "output": output,
        "validation": validation,
        "base_model": base_model,
        "max_steps": max_steps,
        "epochs": epochs,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "learning_rate": learning_rate,
        "seed": seed,
        "format": format,
        "columns": columns,
        "precision": precision,
        "batch_rows": batch_rows,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "context_length": context_length,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "price_per_hour": price_per_hour,
        "use_rslora": use_rslora or None,
        "use_dora": use_dora or None,
        "resume": resume or None,
        "manifest": manifest,
        "policy": policy,
        "allow_unlicensed": allow_unlicensed or None,
        "allow_secrets": allow_secrets or None,
        "pii": pii,
        "dedupe": dedupe,
        "canaries": canaries,
    }
    cfg = load_config(config, overrides)
    if max_steps is not None:  # a flag beats the YAML, whichever of the two the YAML set
        cfg.epochs = None
    if epochs is not None:
        cfg.max_steps = None
    run_training(cfg, model_cache=_cache(home), reporter=RichReporter(console))


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="The user message.")],
    adapter: Annotated[Path | None, typer.Option(help="A trained adapter directory.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the adapter's).")] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 128,
    home: Home = None,
) -> None:
    """Answer one prompt with a base model or an adapter (greedy), for a quick look."""
    from loraforge.models.generate import load_chat_model
    from loraforge.models.sources import DEFAULT_BASE_MODEL

    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    model = load_chat_model(
        _cache(home), adapter=adapter, base_model=base_model or (None if adapter else DEFAULT_BASE_MODEL)
    )
    console.print(model.chat(prompt, system=system, max_new_tokens=max_new_tokens), highlight=False)


@app.command("eval")
def eval_adapter(
    adapter: Annotated[Path, typer.Option(help="Adapter directory (PEFT files + manifest.json).")],
    suites: Annotated[
        str | None,
        typer.Option(help="Comma-separated: task,regression,bias,truthfulness,safety,memorization (default: all)."),
    ] = None,
    gate: Annotated[Path | None, typer.Option(help="Gate policy YAML (default: the shipped one).")] = None,
    report: Annotated[
        Path | None, typer.Option(help="Directory for eval.json and eval.html (default: ADAPTER/eval).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Task data instead of the manifest's validation data.")] = None,
    max_items: Annotated[int | None, typer.Option(help="Cap every subset at N items (a quick look).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subsets and the bootstrap.")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for PyTorch.")] = None,
    home: Home = None,
) -> None:
    """Evaluate an adapter against its base model and apply the release gate.

    Exit 0 the gate passed, 3 it failed, 4 it cannot decide (an interval crosses a threshold) and the
    policy blocks undecided rules, 1 an error.
    """
    from loraforge.evaluate import DEFAULT_SIZES, EvalConfig, evaluate, parse_suites
    from loraforge.evaluate.display import show_evaluation

    if max_items is not None and max_items < 1:
        raise ConfigError(f"--max-items must be >= 1, got {max_items}")
    sizes = {k: min(v, max_items) for k, v in DEFAULT_SIZES.items()} if max_items else {}
    config = EvalConfig(
        adapter=adapter,
        suites=parse_suites(suites),
        policy=gate,
        report=report,
        data=data,
        sizes=sizes,
        seed=seed,
        threads=threads,
    )
    result = evaluate(
        config, model_cache=_cache(home), progress=lambda msg: err_console.print(f"[dim]{escape(msg)}[/]")
    )
    show_evaluation(console, result)
    raise typer.Exit(result.verdict.exit_status)


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


if __name__ == "__main__":
    main()
