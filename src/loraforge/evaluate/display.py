"""How the CLI and the demo show an evaluation: the verdict first, then base vs adapter per measure."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraforge.evaluate.runner import EvalResult


def _value(x: float, unit: str) -> str:
    return f"{x:.1f}%" if unit == "%" else f"{x:.3f}"


def show_evaluation(console: Console, result: EvalResult) -> None:
    """Print the scores table, the verdict with its reasons, and where the report is."""
    table = Table(title="base vs adapter (95% intervals)", title_justify="left")
    for col in ("suite", "measure", "base", "adapter", "change"):
        table.add_column(col, justify="left" if col in ("suite", "measure") else "right")
    for suite in result.report["suites"]:
        for m in suite["metrics"]:
            u, d = m["unit"], m["delta"]
            sign = "+.1f" if u == "%" else "+.3f"
            change = f"{d['value']:{sign}} [{d['low']:{sign}}, {d['high']:{sign}}]"
            table.add_row(
                suite["name"],
                escape(m["label"]),
                _value(m["base"]["value"], u),
                _value(m["adapter"]["value"], u),
                change,
            )
    console.print(table)
    for suite in result.report["suites"]:
        for note in suite["notes"]:
            console.print(f"[dim]{escape(suite['name'])}: {escape(note)}[/]")
    verdict = result.verdict
    colour = "green" if verdict.passed else "red"
    policy = result.report["policy"]["name"]
    console.print(f"[bold {colour}]gate {verdict.word}[/] (policy {escape(policy)})")
    for reason in verdict.failures:
        console.print(f"  [red]✗[/] {escape(reason)}", soft_wrap=True)
    for reason in verdict.unchecked:
        console.print(f"  [dim]- {escape(reason)}[/]", soft_wrap=True)
    console.print(f"report: {result.html_path}\n        {result.json_path}")
