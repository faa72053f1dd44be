"""How the CLI shows things: data-check results and training progress, with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from loraforge.data.licensing import LicenseReport, self_attested
from loraforge.data.validate import DataReport
from loraforge.train.estimate import Figures
from loraforge.train.loop import Reporter, TrainResult


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def show_data_report(console: Console, report: DataReport) -> None:
    for p in report.problems:
        style = "red" if p.severity == "error" else "yellow"
        console.print(f"[{style}]{p.severity}[/]: {escape(str(p))}", highlight=False, soft_wrap=True)
    s = report.summary()
    table = Table(title=escape(f"{report.path} ({s['format']})"), show_header=False, title_justify="left")
    table.add_row("examples", f"{s['examples']} parsed, {s['usable_examples']} usable")
    table.add_row("messages", ", ".join(f"{k}: {v}" for k, v in sorted(s["messages"].items())))
    if s["untrained_assistant_messages"]:
        table.add_row("assistant messages with weight 0", str(s["untrained_assistant_messages"]))
    if report.tokenized:
        table.add_row("tokens", f"{s['tokens']:,} ({s['trained_tokens']:,} trained)")
        table.add_row("tokens per example", f"min {s['min_tokens']}, mean {s['mean_tokens']}, max {s['max_tokens']}")
        table.add_row("over the context", f"{s['truncated']} truncated, {s['dropped']} dropped")
        table.add_row("suggested epochs", str(s["suggested_epochs"]))
    table.add_row("problems", f"{s['errors']} error(s), {s['warnings']} warning(s)")
    console.print(table)
    hist = s["histogram"]
    if hist:
        peak = max(c for _, _, c in hist) or 1
        console.print("token length histogram:")
        for lo, hi, count in hist:
            console.print(f"  {lo:>6}-{hi:<6} {'█' * max(1 if count else 0, round(30 * count / peak))} {count}")
    verdict = "[green]OK: ready to train[/]" if report.ok else "[red]refused: fix the errors above[/]"
    console.print(verdict)


def show_licensing(console: Console, report: LicenseReport) -> None:
    if report.manifest is None:
        return
    names = ", ".join(m.path.name for m in report.manifests)
    title = escape(f"licences ({names}, policy {report.policy.name})")
    table = Table(title=title, title_justify="left")
    for col in ("source", "licence", "owner", "personal data", "examples", "decision"):
        table.add_column(col)
    decisions = {d.source: d for d in report.decisions}
    for s in report.sources:
        d = decisions[s.label]
        colour = {"allow": "green", "review": "yellow", "deny": "red"}[d.verdict]
        verdict = f"[{colour}]{d.verdict}[/] ({escape(d.rule)})"
        if d.cleared_by:
            verdict += f", cleared by {escape(d.cleared_by)}"
            if s.approved_by and self_attested(s.approved_by, s.owner):
                verdict += " [yellow](self-attested: the data's own owner or no named approver)[/]"
        table.add_row(
            escape(s.label),
            s.license,
            escape(s.owner),
            "yes" if s.personal_data else "no",
            str(report.examples_per_source.get(s.label, 0)),
            verdict,
        )
    console.print(table)


def show_governance(console: Console, governance: dict[str, Any]) -> None:
    pii = governance["pii"]
    counts = {**pii["pii"], **pii["secrets"]}
    table = Table(title="personal data and secrets", title_justify="left")
    table.add_column("type")
    table.add_column("findings", justify="right")
    table.add_column("examples (masked)")
    for kind, count in sorted(counts.items()):
        table.add_row(kind, str(count), escape("; ".join(pii["samples"].get(kind, [])[:2])))
    if counts:
        console.print(table)
    else:
        console.print("personal data and secrets: none found")
    line = (
        f"duplicates: {governance['exact_duplicate_groups']} exact group(s), "
        f"{governance['near_duplicate_pairs']} near-duplicate pair(s) at similarity ≥ {governance['threshold']}"
    )
    if "contamination" in governance:
        c = governance["contamination"]
        line += f"; contamination: {c['overlapping']} of {c['of']} examples of {escape(c['against'])} overlap"
    console.print(line)


class RichReporter(Reporter):
    """Pre-flight table, a live progress bar (loss, tokens/s, ETA), evaluations and the final figures."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None
        self.estimated: Figures | None = None

    def estimate(self, figures: Figures, info: dict[str, Any]) -> None:
        self.estimated = figures
        t = Table(title="pre-flight estimate", show_header=False, title_justify="left")
        t.add_row("base model", f"{info['base_model']} ({info['dtype']} on {info['device']})")
        t.add_row("data", f"{info['train_examples']} training / {info['validation_examples']} validation examples")
        t.add_row("schedule", f"{info['steps']} steps ≈ {info['epochs']} epochs")
        t.add_row("trainable parameters", f"{info['trainable_parameters']:,}")
        t.add_row("tokens", f"{figures.tokens:,} ({figures.trained_tokens:,} trained)")
        t.add_row("compute", f"{figures.flops / 1e12:.1f} TFLOP")
        t.add_row("time", f"≈ {_duration(figures.seconds)} ({figures.tokens_per_second:.0f} tokens/s)")
        t.add_row("peak memory", f"≈ {_gb(figures.peak_rss_bytes)}")
        t.add_row("cost", f"≈ {figures.cost:.4f} at {figures.price_per_hour}/hour")
        self.console.print(t)

    def start(self, total_steps: int, start_step: int) -> None:
        if start_step:
            self.console.print(f"resuming at step {start_step} of {total_steps}")
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-")
        self.progress.start()

    def step(self, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=record["step"],
                loss=f"{record['loss']:.4f}",
                tps=f"{record['tokens_per_s']:.0f}",
            )

    def evaluation(self, record: dict[str, Any]) -> None:
        self.console.print(
            f"step {record['step']}: validation loss {record['val_loss']:.4f} (training {record['train_loss']:.4f})"
        )

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning[/]: {escape(message)}")

    def finish(self, result: TrainResult) -> None:
        if self.progress is not None:
            self.progress.stop()
        f = result.figures
        est = self.estimated
        t = Table(title="actual figures", title_justify="left")
        t.add_column("")
        t.add_column("estimated", justify="right")
        t.add_column("actual", justify="right")
        rows = [
            ("tokens", f"{est.tokens:,}" if est else "-", f"{f.tokens:,}"),
            ("time", _duration(est.seconds) if est else "-", _duration(f.seconds)),
            ("tokens/s", f"{est.tokens_per_second:.0f}" if est else "-", f"{f.tokens_per_second:.0f}"),
            ("GFLOP/s", f"{est.gflops_per_second:.1f}" if est else "-", f"{f.gflops_per_second:.1f}"),
            ("peak memory", _gb(est.peak_rss_bytes) if est else "-", _gb(f.peak_rss_bytes)),
            ("cost", f"{est.cost:.4f}" if est else "-", f"{f.cost:.4f}"),
        ]
        for row in rows:
            t.add_row(*row)
        self.console.print(t)
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
        self.console.print(f"final training loss {result.final_loss:.4f}, validation loss {val}")
        self.console.print(f"adapter:  {result.output}")
        self.console.print(f"manifest: {result.output / 'manifest.json'}")
        self.console.print(f"metrics:  {result.output / 'metrics.jsonl'}")
        self.console.print(f"plot:     {result.output / 'loss.png'}")
        codes = [f["flag"] for f in result.manifest.flags()] if result.manifest else []
        if codes:
            self.console.print(f"[yellow]governance flags[/]: {', '.join(codes)} (details in manifest.json)")
