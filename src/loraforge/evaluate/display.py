"""How the CLI and the demo show an evaluation: the verdict first, then base vs adapter per measure."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraforge.evaluate.pipeline import EvalResult

_COLOUR = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow"}
_GATE_CELL = {"PASS": "[green]pass[/]", "FAIL": "[red]FAIL[/]", "INCONCLUSIVE": "[yellow]inconclusive[/]"}


def _value(x: float, unit: str) -> str:
    return f"{x:.1f}%" if unit == "%" else f"{x:.3f}"


def show_governance_flags(console: Console, flags: list[dict[str, str]]) -> None:
    """Print an adapter's governance exceptions (``governance_flags`` of its manifest), if any."""
    if flags:
        console.print(f"[bold yellow]governance exceptions ({len(flags)})[/]: this adapter was trained with")
    for f in flags:
        console.print(f"  [yellow]![/] {escape(f['flag'])}: {escape(f['detail'])}", soft_wrap=True)


def show_evaluation(console: Console, result: EvalResult) -> None:
    """Print the governance exceptions, the scores table, the verdict with its reasons, and where the report is."""
    show_governance_flags(console, result.report.get("governance_flags", []))
    table = Table(title="base vs adapter (95% intervals)", title_justify="left")
    for col in ("suite", "measure", "base", "adapter", "change", "gate"):
        table.add_column(col, justify="left" if col in ("suite", "measure") else "right")
    ruled = {r.metric: r.outcome for r in result.verdict.rules}
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
                _GATE_CELL.get(ruled.get(m["id"], ""), ""),
            )
    console.print(table)
    for suite in result.report["suites"]:
        for note in suite["notes"]:
            console.print(f"[dim]{escape(suite['name'])}: {escape(note)}[/]")
    verdict = result.verdict
    policy = result.report["policy"]["name"]
    console.print(f"[bold {_COLOUR[verdict.word]}]gate {verdict.word}[/] (policy {escape(policy)})")
    for reason in verdict.failures:
        console.print(f"  [red]✗[/] {escape(reason)}", soft_wrap=True)
    if verdict.inconclusive:
        blocks = "block the release" if verdict.inconclusive_policy == "block" else "do not block (policy: pass)"
        console.print(f"  [yellow]inconclusive rules (the 95% interval crosses the threshold; they {blocks}):[/]")
    for reason in verdict.inconclusive:
        console.print(f"  [yellow]?[/] {escape(reason)}", soft_wrap=True)
    for reason in verdict.unchecked:
        console.print(f"  [dim]- {escape(reason)}[/]", soft_wrap=True)
    console.print(f"report: {result.html_path}\n        {result.json_path}")
