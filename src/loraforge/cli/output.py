"""How the CLI and the demo show things, with rich: the consoles, data-check results, redaction
findings, evaluations with their verdict, and the key and adapter lists.

The live training display is in :mod:`loraforge.cli.train_progress`: it subclasses the training
loop's ``Reporter``, and importing the training code here would load PyTorch on every command.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from loraforge.data.licensing import LicenseReport
    from loraforge.data.scan import ScanReport
    from loraforge.data.validate import DataReport
    from loraforge.evaluate import EvalResult
    from loraforge.serve.adapters import Registration
    from loraforge.serve.keys import KeyRecord

console = Console()
err_console = Console(stderr=True)

VERDICT_COLOUR = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow"}
_GATE_CELL = {"PASS": "[green]pass[/]", "FAIL": "[red]FAIL[/]", "INCONCLUSIVE": "[yellow]inconclusive[/]"}


# --- data ------------------------------------------------------------------------------------------
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
    from loraforge.data.licensing import self_attested

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


def show_redaction(console: Console, source: Path, out: Path, report: ScanReport, written: int) -> None:
    """The findings of ``data redact`` per type, and how many examples were redacted, dropped, written."""
    table = Table(title=escape(f"{source} → {out}"), title_justify="left")
    table.add_column("type")
    table.add_column("findings", justify="right")
    for kind, count in sorted({**report.pii_counts, **report.secret_counts}.items()):
        table.add_row(kind, str(count))
    console.print(table)
    console.print(
        f"{report.examples} examples: {report.redacted} redacted, {report.dropped} dropped, {written} written"
    )


# --- evaluation ------------------------------------------------------------------------------------
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
    console.print(f"[bold {VERDICT_COLOUR[verdict.word]}]gate {verdict.word}[/] (policy {escape(policy)})")
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


# --- keys and adapters -----------------------------------------------------------------------------
def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def show_keys(console: Console, records: list[KeyRecord]) -> None:
    """The API keys: ids, tenants, roles and dates (never the keys)."""
    table = Table("id", "tenant", "role", "owner", "environment", "created", "revoked")
    for r in records:
        role = r.role + (" (all tenants)" if r.all_tenants else "")
        table.add_row(r.id, r.tenant, role, r.owner or "-", r.environment, _when(r.created_at), _when(r.revoked_at))
    console.print(table)


def show_adapters(console: Console, registrations: list[Registration]) -> None:
    """The registered adapters, their owners and their governance notes."""
    table = Table("name", "owner", "state", "base model", "weights sha256", "added", "governance")
    for r in registrations:
        notes = [*r.governance_flags, *([f"override: {r.governance_override}"] if r.governance_override else [])]
        notes += [f"approved although the gate did not pass: {r.release_override}"] if r.release_override else []
        table.add_row(
            r.name,
            "public" if r.public else r.tenant or "",
            r.state,
            r.base_model,
            r.weights_sha256[:12],
            _when(r.added_at),
            ", ".join(notes) or "passed" if r.public else ", ".join(notes) or "-",
        )
    console.print(table)
