"""The evaluation report: ``eval.json`` for machines, ``eval.html`` (+ ``deltas.png``) for people."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from loraforge.files import write_bytes_atomic, write_text_atomic

ASSETS = Path(__file__).parent / "assets"
DATA_ASSETS = Path(__file__).parents[1] / "data" / "assets"


def _num(x: float, unit: str) -> str:
    if unit == "%":
        return f"{x:.1f}%"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _signed(x: float, unit: str) -> str:
    return f"{x:+.1f}" if unit == "%" else f"{x:+.3f}"


def _tone(m: dict[str, Any]) -> str:
    """good/bad when the whole paired interval lies on one side of zero, in the metric's better direction."""
    d, better = m["delta"], m["better"]
    if better == "neither" or d["low"] <= 0 <= d["high"]:
        return ""
    up = d["low"] > 0
    return "good" if up == (better == "higher") else "bad"


def deltas_png(report: dict[str, Any]) -> bytes:
    """A forest plot: each metric's change (adapter − base) with its 95% paired interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for s in report["suites"] for m in s["metrics"] if m["unit"] == "%"]
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.2), dpi=100)
    colours = {"good": "#1e8e3e", "bad": "#c5221f", "": "#3b6ea8"}
    for y, m in enumerate(reversed(rows)):
        d = m["delta"]
        ax.errorbar(
            d["value"],
            y,
            xerr=[[d["value"] - d["low"]], [d["high"] - d["value"]]],
            fmt="o",
            color=colours[_tone(m)],
            capsize=3,
        )
    ax.axvline(0, color="#888", lw=1)
    ax.set_yticks(range(len(rows)), [m["label"][:60] for m in reversed(rows)], fontsize=8)
    ax.set_xlabel("adapter − base (points), 95% paired bootstrap interval")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_html(report: dict[str, Any], plot: bytes | None) -> str:
    from jinja2 import Environment

    from loraforge.reportfilters import pretty

    env = Environment(autoescape=True)
    # every answer of a probe is in eval.json; the page shows samples, not all of them
    measured = lambda d: {k: v for k, v in d.items() if k != "answers"}  # noqa: E731
    env.filters.update(num=_num, signed=_signed, tone=_tone, pretty=pretty, measured=measured)
    template = env.from_string((ASSETS / "eval.html.j2").read_text(encoding="utf-8"))
    return template.render(
        r=report,
        css=(DATA_ASSETS / "report.css").read_text(encoding="utf-8"),
        plot=base64.b64encode(plot).decode() if plot else "",
        gate={x["metric"]: x["outcome"] for x in report["gate"].get("rules", [])},  # metric id → PASS/FAIL/INCONCLUSIVE
    )


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``eval.json``, ``deltas.png`` and ``eval.html`` into ``out`` (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    has_rates = any(m["unit"] == "%" for s in report["suites"] for m in s["metrics"])
    plot = deltas_png(report) if has_rates else None
    if plot:
        write_bytes_atomic(out / "deltas.png", plot)
    write_text_atomic(out / "eval.json", json.dumps(report, indent=2, ensure_ascii=False))
    write_text_atomic(out / "eval.html", render_html(report, plot))
    return out / "eval.json", out / "eval.html"
