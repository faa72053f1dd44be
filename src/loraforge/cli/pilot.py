"""``loraforge pilot …``, ``loraforge monitor`` and ``loraforge adapters profile``: a challenger for
part of a route's users, what production records of routes and adapters, and the input profile
input drift is measured against.

Both act with an API key like the release steps (``--key`` or ``$LORAFORGE_API_KEY``): starting,
stopping and promoting a pilot need an admin's key; reports and monitoring an admin's, approver's
or auditor's.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraforge.cli.options import DatabaseUrl, Home
from loraforge.cli.output import console
from loraforge.cli.release import Key, OptionalReason, context
from loraforge.errors import ConfigError

pilot_app = typer.Typer(
    help="Pilots: send a share of a route's end users to a challenger adapter and compare.", no_args_is_help=True
)
monitor_app = typer.Typer(
    help="Monitoring: requests, errors, refusals, feedback and input drift.", no_args_is_help=True
)
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``6h``, ``7d`` in seconds."""
    match = DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not a duration: write 90s, 15m, 6h or 7d")
    return float(match.group(1)) * UNITS[match.group(2)]


def _pilots(home: Path | None, url: str | None, key: str | None) -> tuple[Any, Any]:
    from loraforge.govern.pilot import Pilots

    who, _, deployments = context(home, url, key)
    return who, Pilots(deployments)


@pilot_app.command("start")
def pilot_start(
    route: Annotated[str, typer.Argument(help="A route that serves an adapter.")],
    adapter: Annotated[str, typer.Argument(help="The challenger: an approved adapter of the route's owner.")],
    percent: Annotated[int, typer.Option(help="Share of end users sent to the challenger, 1 to 99.")] = 10,
    reason: OptionalReason = None,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Send PERCENT of ROUTE's end users to ADAPTER; each user keeps their arm (an admin's key)."""
    who, pilots = _pilots(home, database_url, key)
    step = pilots.start(who, route, adapter, percent, reason=reason)
    console.print(
        f"[green]pilot {step.pilot} started[/] on {escape(route)}: {percent}% of end users get "
        f"{escape(adapter)}, the others {escape(step.control)}"
    )


@pilot_app.command("stop")
def pilot_stop(
    route: Annotated[str, typer.Argument(help="The route whose pilot ends.")],
    reason: OptionalReason = None,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """End ROUTE's pilot: every user gets the control again (an admin's key)."""
    who, pilots = _pilots(home, database_url, key)
    step = pilots.stop(who, route, reason=reason)
    console.print(f"pilot {step.pilot} stopped: {escape(route)} serves {escape(step.control)} to everyone")


@pilot_app.command("promote")
def pilot_promote(
    route: Annotated[str, typer.Argument(help="The route whose challenger wins.")],
    reason: OptionalReason = None,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """End ROUTE's pilot and deploy its challenger on the route (an admin's key; a rollback undoes it)."""
    who, pilots = _pilots(home, database_url, key)
    step = pilots.promote(who, route, reason=reason)
    console.print(f"[green]promoted[/] {escape(step.challenger)}: {escape(route)} serves it to everyone")


@pilot_app.command("list")
def pilot_list(
    route: Annotated[str, typer.Argument(help="The route.")],
    as_json: Json = False,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Every pilot of ROUTE, newest first."""
    who, pilots = _pilots(home, database_url, key)
    rows = pilots.list(who, route)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("pilot", "control", "challenger", "%", "state", "started", "by", "reason")
    for p in rows:
        started = datetime.fromtimestamp(p["started_at"], UTC).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            str(p["pilot"]),
            p["control"],
            p["challenger"],
            str(p["percent"]),
            p["state"],
            started,
            p["actor"],
            p["reason"] or "",
        )
    console.print(table)


def _rate(e: dict[str, Any]) -> str:
    return f"{e['value']:.1%} ({e['low']:.1%}–{e['high']:.1%})" if e["n"] else "-"


def _seconds(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else "-"


def _score(s: dict[str, Any] | None) -> str:
    return f"{s['value']:.3f} (n={s['n']}, {s['users']} users)" if s else "-"


@pilot_app.command("report")
def pilot_report(
    route: Annotated[str, typer.Argument(help="The route.")],
    pilot: Annotated[int | None, typer.Option(help="The pilot's number (default: the latest).")] = None,
    as_json: Json = False,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Compare the arms of ROUTE's pilot: feedback scores with intervals, errors, refusals, latency, cost."""
    who, pilots = _pilots(home, database_url, key)
    report = pilots.report(who, route, pilot)
    if as_json:
        console.print_json(json.dumps(report))
        return
    p = report["pilot"]
    console.print(
        f"[bold]pilot {p['pilot']}[/] on {escape(p['route'])} ({p['state']}): {p['percent']}% to "
        f"{escape(p['challenger'])}, control {escape(p['control'])}"
    )
    table = Table("", "requests", "users", "score", "feedback rate", "refusals", "errors", "p50 s", "p95 s", "cost/req")
    for arm in ("control", "challenger"):
        a = report["arms"][arm]
        table.add_row(
            f"{arm} ({p[arm]})",
            str(a["requests"]),
            str(a["users"]),
            _score(a["score"]),
            _rate(a["feedback_rate"]),
            _rate(a["refusal_rate"]),
            _rate(a["error_rate"]),
            _seconds(a["latency_p50_s"]),
            _seconds(a["latency_p95_s"]),
            f"{a['cost_per_request']:.6f}" if a["cost_per_request"] is not None else "-",
        )
    console.print(table)
    console.print(report["verdict"], highlight=False, soft_wrap=True)


def monitor(
    name: Annotated[str, typer.Argument(help="A route or an adapter.")],
    since: Annotated[str, typer.Option(help="How far back: 90m, 24h, 7d.")] = "24h",
    bucket: Annotated[str, typer.Option(help="One row per this much time: 15m, 1h, 1d.")] = "1h",
    as_json: Json = False,
    key: Key = None,
    database_url: DatabaseUrl = None,
    home: Home = None,
) -> None:
    """Requests, errors, refusals, feedback, latency, cost and input drift of NAME over time, and its alerts."""
    from loraforge.govern.monitor import summary

    who, release, _ = context(home, database_url, key)
    result = summary(release.registry, who, name, since_s=parse_duration(since), bucket_s=parse_duration(bucket))
    if as_json:
        console.print_json(json.dumps(result))
        return
    total = result["total"]
    console.print(
        f"[bold]{escape(name)}[/] ({result['kind']}), last {since}: {total['requests']} requests, "
        f"{total['users']} end users, cost {total['cost']:.6f}"
    )
    table = Table("from", "requests", "errors", "refusals", "unfamiliar", "score", "p50 s", "p95 s", "tokens")
    for b in result["buckets"]:
        if not b["requests"]:
            continue
        table.add_row(
            datetime.fromtimestamp(b["start"], UTC).strftime("%m-%d %H:%M"),
            str(b["requests"]),
            _rate(b["error_rate"]),
            _rate(b["refusal_rate"]),
            _rate(b["unfamiliar_share"]),
            _score(b["score"]),
            _seconds(b["latency_p50_s"]),
            _seconds(b["latency_p95_s"]),
            str(b["prompt_tokens"] + b["completion_tokens"]),
        )
    console.print(table)
    for adapter, state in result["drift"].items():
        if state is None:
            console.print(f"{escape(adapter)}: input drift not watched (its training wrote no input profile)")
        else:
            console.print(
                f"{escape(adapter)}: {state['unfamiliar_share']:.0%} of its latest {state['prompts']} prompts "
                f"unfamiliar (alert above {state['threshold']:.0%} in a full window of {state['window']})",
                highlight=False,
            )
    for alert in result["alerts"]:
        console.print(f"[red]ALERT {alert['kind']}[/]: {escape(alert['message'])}", soft_wrap=True)
    if not result["alerts"]:
        console.print("[green]no alerts[/]")


def adapter_profile(
    adapter_dir: Annotated[Path, typer.Argument(help="The adapter's directory (as training wrote it).")],
    data: Annotated[Path, typer.Option(help="The adapter's training data (JSONL, JSON or CSV).")],
) -> None:
    """Write the input profile (input_profile.json) of an adapter trained without one, from its training data.

    Register the adapter again afterwards so that the store's copy has it.
    """
    from loraforge.data.drift import build_profile, prompt_texts
    from loraforge.data.formats import load_dataset

    if not adapter_dir.is_dir():
        raise ConfigError(f"{adapter_dir} is not a directory")
    loaded = load_dataset(data)
    prompts = [prompt_texts((m.role, m.content) for m in ex.messages) for ex in loaded.examples]
    profile = build_profile(prompts)
    path = profile.write(adapter_dir)
    console.print(
        f"wrote {path}: {profile.prompts} prompts, unfamiliar above novelty {profile.line:.3f}", highlight=False
    )
