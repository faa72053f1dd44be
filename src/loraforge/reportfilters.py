"""Jinja filters shared by the HTML reports (datasheet, evaluation, and those that come next)."""

from __future__ import annotations

import json
from typing import Any


def pretty(value: Any) -> str:
    """A value as a person reads it: ``key: value`` lines, comma-separated lists, compact JSON inside."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if not value:
            return "none"
        return "\n".join(f"{k}: {v if isinstance(v, str | int | float) else compact(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(x, str | int | float) for x in value):
        return ", ".join(map(str, value)) if value else "none"
    if isinstance(value, list) and all(isinstance(x, dict) for x in value):
        return "\n".join(", ".join(f"{k}: {v}" for k, v in x.items()) for x in value) or "none"
    return compact(value)


def compact(value: Any) -> str:
    if isinstance(value, dict) and not value:
        return "none"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
