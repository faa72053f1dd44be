"""Monitoring a route or adapter in production, from what the server recorded of each request.

Every finished request leaves a row in ``usage_records`` (status, latency, tokens, cost, whether
its answer refused, its prompt's novelty against the adapter's training prompts, its pilot arm) and
may get an end user's rating (``feedback``). ``summary`` reads them back over a period in time
buckets (requests, error and refusal rates with Wilson intervals, latency percentiles, tokens,
cost, ratings, unfamiliar prompts), the same figures per adapter that answered, and the alerts:

* ``input_drift``: the adapter's latest full window of prompts has more unfamiliar ones than 5%
  plus three standard deviations (``data.drift``);
* ``errors``: the period's error rate is above 5% with 95% confidence (the Wilson interval's
  lower end);
* ``refusals``: the last bucket's refusal rate is above the rest of the period's with no overlap
  of their Wilson intervals (an adapter that starts refusing).

Being computed from the registry, it holds across restarts and for several servers sharing one
database; the live Prometheus gauges (``serve.observe``) are per server process.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from loraforge.data.drift import DEFAULT_WINDOW, alert_share
from loraforge.errors import ReleaseError
from loraforge.evaluate.stats import wilson
from loraforge.govern.release import READERS, Principal, in_scope
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter, Feedback, Pilot, Route, UsageRecord

COLUMNS = (
    UsageRecord.ts,
    UsageRecord.adapter,
    UsageRecord.arm,
    UsageRecord.user_hash,
    UsageRecord.request_id,
    UsageRecord.status,
    UsageRecord.latency_s,
    UsageRecord.prompt_tokens,
    UsageRecord.completion_tokens,
    UsageRecord.cost,
    UsageRecord.refusal,
    UsageRecord.unfamiliar,
    Feedback.score,
)
ERROR_ALERT = 0.05  # an error rate certainly above this alerts
MAX_BUCKETS = 500


def requests(s: Session, where: ColumnElement[bool]) -> Sequence[Any]:
    """The recorded requests matching ``where``, oldest first, with their feedback score (or None)."""
    query = select(*COLUMNS).outerjoin(Feedback, Feedback.request_id == UsageRecord.request_id).where(where)
    return s.execute(query.order_by(UsageRecord.ts, UsageRecord.id)).all()


def clusters(rows: Sequence[Any]) -> list[list[float]]:
    """Feedback scores grouped by end user (a request without a user id is its own group)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.score is not None:
            groups[r.user_hash or f"request:{r.request_id}"].append(float(r.score))
    return list(groups.values())


def _quantile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.quantile(values, q)), 4) if values.size else None


def figures(rows: Sequence[Any]) -> dict[str, Any]:
    """What a set of requests did: rates with Wilson intervals, latency, tokens, cost, ratings."""
    n = len(rows)
    ok = [r for r in rows if r.status < 400]
    latencies = np.array([r.latency_s for r in ok if r.latency_s is not None], dtype=np.float64)
    judged = [r for r in ok if r.refusal is not None]
    scored = [r for r in rows if r.unfamiliar is not None]
    scores = [float(r.score) for r in rows if r.score is not None]
    cost = sum(float(r.cost) for r in rows)
    return {
        "requests": n,
        "users": len({r.user_hash for r in rows if r.user_hash is not None}),
        "error_rate": wilson(n - len(ok), n).to_json(),
        "refusal_rate": wilson(sum(1 for r in judged if r.refusal), len(judged)).to_json(),
        "unfamiliar_share": wilson(sum(1 for r in scored if r.unfamiliar), len(scored)).to_json(),
        "feedback": len(scores),
        "feedback_rate": wilson(len(scores), n).to_json(),
        "score": (
            {"value": round(sum(scores) / len(scores), 6), "n": len(scores), "users": len(clusters(rows))}
            if scores
            else None
        ),
        "latency_p50_s": _quantile(latencies, 0.5),
        "latency_p95_s": _quantile(latencies, 0.95),
        "prompt_tokens": sum(int(r.prompt_tokens) for r in rows),
        "completion_tokens": sum(int(r.completion_tokens) for r in rows),
        "cost": round(cost, 8),
        "cost_per_request": round(cost / n, 8) if n else None,
    }


def drift(s: Session, adapter: str, window: int = DEFAULT_WINDOW) -> dict[str, Any] | None:
    """``adapter``'s latest ``window`` scored prompts (whenever they came): their unfamiliar share
    and whether it alerts (None: no prompt of it was scored; its training wrote no input profile)."""
    flags = s.scalars(
        select(UsageRecord.unfamiliar)
        .where(UsageRecord.adapter == adapter, UsageRecord.unfamiliar.is_not(None))
        .order_by(UsageRecord.ts.desc(), UsageRecord.id.desc())
        .limit(window)
    ).all()
    if not flags:
        return None
    share = sum(1 for f in flags if f) / len(flags)
    threshold = alert_share(window)
    return {
        "prompts": len(flags),
        "window": window,
        "unfamiliar_share": round(share, 4),
        "threshold": round(threshold, 4),
        "alert": len(flags) >= window and share > threshold,
    }


def production_record(s: Session, name: str) -> dict[str, Any]:
    """What production recorded of adapter ``name`` (the compliance report's monitoring evidence):
    its requests' figures, its input drift, its pilots."""
    served = requests(s, UsageRecord.adapter == name)
    pilots = s.scalars(select(Pilot).where((Pilot.adapter == name) | (Pilot.control == name)).order_by(Pilot.id))
    return {
        "requests": figures(served) if served else None,
        "drift": drift(s, name),
        "pilots": [
            {
                "route": p.route,
                "pilot": p.id,
                "role": "challenger" if p.adapter == name else "control",
                "percent": p.percent,
                "outcome": p.outcome or "running",
            }
            for p in pilots
        ],
    }


def describe(record: dict[str, Any]) -> str:
    """One sentence of a ``production_record`` with requests."""
    served, watched = record["requests"], record["drift"]
    drift_text = (
        f"input drift watched: {watched['unfamiliar_share']:.0%} of the latest {watched['prompts']} prompts "
        f"unfamiliar{' (ALERT)' if watched['alert'] else ''}"
        if watched
        else "input drift not watched (no input profile from training)"
    )
    score = f" (mean score {served['score']['value']:.2f})" if served["score"] else ""
    return (
        f"{served['requests']} requests recorded: {served['error_rate']['value']:.1%} errors, "
        f"{served['refusal_rate']['value']:.1%} refusals, {served['feedback']} end-user ratings{score}; "
        f"{drift_text}; {len(record['pilots'])} pilot(s)"
    )


def _alerts(total: dict[str, Any], buckets: list[dict[str, Any]], drifts: dict[str, Any]) -> list[dict[str, Any]]:
    alerts = []
    for adapter, state in drifts.items():
        if state is not None and state["alert"]:
            alerts.append(
                {
                    "kind": "input_drift",
                    "adapter": adapter,
                    "message": f"{state['unfamiliar_share']:.0%} of the latest {state['window']} prompts to "
                    f"{adapter} are unlike its training prompts (alert above {state['threshold']:.0%}): "
                    "check what users ask now, and whether the adapter needs new training data",
                }
            )
    errors = total["error_rate"]
    if errors["low"] > ERROR_ALERT:
        alerts.append(
            {
                "kind": "errors",
                "message": f"{errors['value']:.1%} of requests failed (95% interval {errors['low']:.1%} to "
                f"{errors['high']:.1%}): see the server log's status codes",
            }
        )
    busy = [b for b in buckets if b["refusal_rate"]["n"]]
    if len(busy) >= 2:
        last = busy[-1]["refusal_rate"]
        judged = sum(b["refusal_rate"]["n"] for b in busy[:-1])
        refused = sum(round(b["refusal_rate"]["value"] * b["refusal_rate"]["n"]) for b in busy[:-1])
        before = wilson(refused, judged).to_json()
        if last["low"] > before["high"]:
            alerts.append(
                {
                    "kind": "refusals",
                    "message": f"the latest bucket refused {last['value']:.0%} of answers against "
                    f"{before['value']:.0%} before: an adapter that starts refusing, or a new kind of request",
                }
            )
    return alerts


def summary(
    registry: Registry,
    who: Principal,
    name: str,
    *,
    since_s: float = 86_400,
    bucket_s: float = 3_600,
    now: float | None = None,
) -> dict[str, Any]:
    """The monitoring summary of the route or adapter ``name`` over the last ``since_s`` seconds.

    Raises:
        ReleaseError: a key that is not an admin's, approver's or auditor's; no such route or adapter
            for this key; a bucket or period that is not positive, or more than ``MAX_BUCKETS`` buckets.
    """
    if who.role not in READERS:
        raise ReleaseError("monitoring needs an admin, approver or auditor key", status=403, code="forbidden")
    if since_s <= 0 or bucket_s <= 0 or math.ceil(since_s / bucket_s) > MAX_BUCKETS:
        raise ReleaseError(
            f"the period and the bucket must be positive and give at most {MAX_BUCKETS} buckets "
            f"(got {since_s:g} s in buckets of {bucket_s:g} s)",
            status=400,
            code="bad_period",
        )
    end = time.time() if now is None else now
    start = end - since_s
    with registry.reading() as s:
        route = s.get(Route, name)
        adapter = None if route is not None else s.get(Adapter, name)
        owner = route.tenant if route is not None else adapter.tenant if adapter is not None else None
        if (route is None and adapter is None) or not in_scope(who, owner):
            raise ReleaseError(f"no route or adapter {name!r} for this key", status=404, code="not_found")
        column = UsageRecord.route if route is not None else UsageRecord.adapter
        rows = requests(s, (column == name) & (UsageRecord.ts >= start) & (UsageRecord.ts <= end))
        served = sorted({r.adapter for r in rows if r.adapter is not None} | ({name} if adapter is not None else set()))
        drifts = {a: drift(s, a) for a in served}
    count = math.ceil(since_s / bucket_s)
    grouped: list[list[Any]] = [[] for _ in range(count)]
    for r in rows:
        grouped[min(count - 1, int((r.ts - start) // bucket_s))].append(r)
    buckets = [{"start": round(start + i * bucket_s, 3), **figures(g)} for i, g in enumerate(grouped)]
    total = figures(rows)
    by_adapter = {a or "base": figures([r for r in rows if r.adapter == a]) for a in {r.adapter for r in rows}}
    return {
        "object": "monitor.summary",
        "name": name,
        "kind": "route" if route is not None else "adapter",
        "since": round(start, 3),
        "until": round(end, 3),
        "bucket_s": bucket_s,
        "total": total,
        "adapters": by_adapter,
        "drift": drifts,
        "buckets": buckets,
        "alerts": _alerts(total, buckets, drifts),
    }
