"""How a training run is shown as it goes: the pre-flight estimate, a live progress bar (loss,
tokens/s, ETA), the evaluations, and the actual figures next to the estimated ones.

Apart from :mod:`loraforge.cli.output` because it subclasses the training loop's ``Reporter``, which
imports the training code (and PyTorch) that other commands never load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from loraforge.train import Reporter, TrainResult

if TYPE_CHECKING:
    from loraforge.train.estimate import Figures


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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
