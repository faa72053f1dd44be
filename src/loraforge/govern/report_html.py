"""The HTML pages of the model card and the compliance report (Jinja templates in ``assets/``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraforge.reportfilters import pretty

ASSETS = Path(__file__).with_name("assets")
CSS = Path(__file__).parents[1] / "data" / "assets" / "report.css"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else "-"


def _num(x: float | None, unit: str | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if unit == "%" else f"{x:.3g}"


def render(kind: str, document: dict[str, Any]) -> str:
    """``kind`` is ``model_card`` or ``compliance``; ``document`` the JSON written beside the page."""
    from jinja2 import Environment

    env = Environment(autoescape=True)
    env.filters.update(when=_when, num=_num, pretty=pretty)
    template = env.from_string((ASSETS / f"{kind}.html.j2").read_text(encoding="utf-8"))
    return template.render(d=document, css=CSS.read_text(encoding="utf-8"), owner_mark="TO BE COMPLETED BY THE OWNER")
