"""Pilots: a share of a route's end users sent to a challenger adapter, and the report that compares the arms.

A pilot runs on a route with a deployment: ``percent`` of its end users get the challenger (an
approved adapter of the route's owner, ``deployed`` while the pilot runs), the others keep the
route's adapter (the control). The arm is a hash of the pilot and the end user's id (the request's
``user`` field, or the ``X-End-User`` header), so a user keeps their arm for the whole pilot and
lands independently in the next one; a request without a user id is assigned at random.

While a pilot runs the route is neither deployed again nor rolled back: the pilot ends first,
``stop`` (the control keeps the route) or ``promote`` (the challenger is deployed on it, a
deployment like any other, which a rollback undoes).

The report compares the arms on what the server recorded for each request of the pilot
(``usage_records``: status, latency, tokens, cost, refusals) and the feedback end users gave
(``POST /v1/feedback``): each rate with its Wilson interval, the mean score with a bootstrap
interval over users, and the difference in score, challenger minus control, with its interval and
p-value; it is significant when the interval excludes zero.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.errors import ReleaseError
from loraforge.evaluate.stats import cluster_bootstrap_difference
from loraforge.govern.audit import AuditLog
from loraforge.govern.deploy import CHALLENGER, CONTROL, DEPLOYABLE, Deployments, active, running_pilot
from loraforge.govern.monitor import clusters, figures, requests
from loraforge.govern.release import (
    READERS,
    Principal,
    actor_name,
    audited,
    in_scope,
    record,
    require_admin,
    routes_serving,
)
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter, Pilot, Route, UsageRecord

ARMS = (CONTROL, CHALLENGER)
MIN_FEEDBACK = 30  # per arm: fewer ratings say too little for the verdict to be more than "keep collecting"


def user_hash(tenant: str, user: str) -> str:
    """The pseudonym stored for an end user's id (the id itself is never stored)."""
    return hashlib.sha256(f"loraforge-user\x00{tenant}\x00{user}".encode()).hexdigest()[:32]


def require_reader(who: Principal, what: str = "pilot reports") -> None:
    if who.role not in READERS:
        raise ReleaseError(f"{what} need an admin, approver or auditor key", status=403, code="forbidden")


@dataclass(frozen=True)
class PilotStep:
    route: str
    pilot: int
    control: str
    challenger: str
    percent: int
    state: str  # running | stopped | promoted

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "pilot": self.pilot,
            "control": self.control,
            "challenger": self.challenger,
            "percent": self.percent,
            "state": self.state,
        }


def _step(row: Pilot) -> PilotStep:
    return PilotStep(row.route, row.id, row.control, row.adapter, row.percent, row.outcome or "running")


class Pilots:
    """Start, stop and promote pilots on ``registry``'s routes, checked and audited like every release step."""

    def __init__(self, deployments: Deployments) -> None:
        self.deployments = deployments
        self.registry: Registry = deployments.registry
        self.audit: AuditLog | None = deployments.audit

    def _route(self, s: Session, who: Principal, route: str) -> Route:
        bound = s.get(Route, route)
        if bound is None or not in_scope(who, bound.tenant):
            raise ReleaseError(f"no route {route!r} for this key", status=404, code="route_not_found")
        return bound

    def start(self, who: Principal, route: str, adapter: str, percent: int, *, reason: str | None = None) -> PilotStep:
        """Send ``percent`` of ``route``'s end users to the approved ``adapter``.

        Raises:
            ReleaseError: not an admin key; no such route or adapter for this key; the route serves
                nothing, or runs a pilot already; the adapter is not approved, is the route's own,
                or of another owner; ``percent`` outside 1..99.
        """
        return audited(
            self.audit,
            who,
            "pilot.start",
            route,
            lambda: self._start(who, route, adapter, percent, reason),
            adapter=adapter,
            percent=percent,
            reason=reason,
        )

    def _start(self, who: Principal, route: str, adapter: str, percent: int, reason: str | None) -> PilotStep:
        require_admin(who, "starting a pilot")
        if not isinstance(percent, int) or not 1 <= percent <= 99:
            raise ReleaseError(
                f"percent is the share of end users sent to the challenger, 1 to 99; got {percent!r}",
                status=400,
                code="bad_percent",
            )
        with self.registry.session() as s:
            bound = self._route(s, who, route)
            current = active(s, route)
            if current is None:
                raise ReleaseError(
                    f"route {route!r} serves no adapter; deploy one before piloting another against it",
                    status=409,
                    code="nothing_deployed",
                )
            if running_pilot(s, route) is not None:
                raise ReleaseError(
                    f"route {route!r} runs a pilot already; stop or promote it first",
                    status=409,
                    code="pilot_running",
                )
            row = s.get(Adapter, adapter)
            if row is None or not in_scope(who, row.tenant):
                raise ReleaseError(f"no adapter {adapter!r} for this key", status=404, code="adapter_not_found")
            if row.state not in DEPLOYABLE:
                raise ReleaseError(
                    f"{adapter!r} is {row.state}; only an approved adapter can serve a pilot",
                    status=409,
                    code="not_approved",
                )
            if row.tenant != bound.tenant:
                raise ReleaseError(
                    f"route {route!r} serves adapters of {bound.tenant or 'public'}; "
                    f"{adapter!r} belongs to {row.tenant or 'public'}",
                    status=409,
                    code="other_owner",
                )
            if current.adapter == adapter:
                raise ReleaseError(
                    f"{route!r} serves {adapter!r} already; a pilot needs another adapter",
                    status=409,
                    code="already_deployed",
                )
            pilot = Pilot(
                route=route,
                control=current.adapter,
                adapter=adapter,
                percent=percent,
                actor=actor_name(who),
                reason=reason,
                started_at=time.time(),
            )
            s.add(pilot)
            s.flush()
            if row.state != "deployed":
                record(
                    s,
                    row,
                    "pilot",
                    "deployed",
                    actor=actor_name(who),
                    key_id=who.id,
                    owner=who.owner,
                    reason=reason,
                    details={"route": route, "pilot": pilot.id, "percent": percent},
                )
            return _step(pilot)

    def stop(self, who: Principal, route: str, *, reason: str | None = None) -> PilotStep:
        """End ``route``'s pilot; the control keeps the route."""
        return audited(
            self.audit, who, "pilot.stop", route, lambda: self._end(who, route, "stopped", reason), reason=reason
        )

    def promote(self, who: Principal, route: str, *, reason: str | None = None) -> PilotStep:
        """End ``route``'s pilot and deploy its challenger on the route (a rollback undoes it)."""
        return audited(
            self.audit, who, "pilot.promote", route, lambda: self._end(who, route, "promoted", reason), reason=reason
        )

    def _end(self, who: Principal, route: str, outcome: str, reason: str | None) -> PilotStep:
        require_admin(who, "ending a pilot")
        with self.registry.session() as s:
            bound = self._route(s, who, route)
            pilot = running_pilot(s, route)
            if pilot is None:
                raise ReleaseError(f"route {route!r} runs no pilot", status=409, code="no_pilot")
            pilot.ended_at = time.time()
            pilot.outcome = outcome
            pilot.ended_by = actor_name(who)
            s.flush()
            challenger = s.get(Adapter, pilot.adapter)
            if outcome == "promoted":
                if challenger is None or challenger.state not in DEPLOYABLE:
                    state = "removed" if challenger is None else challenger.state
                    raise ReleaseError(
                        f"the challenger {pilot.adapter!r} is {state}; stop the pilot instead",
                        status=409,
                        code="not_approved",
                    )
                current = active(s, route)
                self.deployments.switch(
                    s, who, bound, current, pilot.adapter, "promote", current.id if current else None, reason
                )
            elif challenger is not None and challenger.state == "deployed" and not routes_serving(s, pilot.adapter):
                record(
                    s,
                    challenger,
                    "pilot_stop",
                    "approved",
                    actor=actor_name(who),
                    key_id=who.id,
                    owner=who.owner,
                    reason=reason,
                    details={"route": route, "pilot": pilot.id},
                )
            return _step(pilot)

    def list(self, who: Principal, route: str) -> list[dict[str, Any]]:
        """Every pilot of ``route``, newest first."""
        require_reader(who)
        with self.registry.reading() as s:
            self._route(s, who, route)
            rows = s.scalars(select(Pilot).where(Pilot.route == route).order_by(Pilot.id.desc())).all()
            return [
                {
                    **_step(r).to_json(),
                    "actor": r.actor,
                    "reason": r.reason,
                    "started_at": r.started_at,
                    "ended_at": r.ended_at,
                    "ended_by": r.ended_by,
                }
                for r in rows
            ]

    def report(self, who: Principal, route: str, pilot: int | None = None) -> dict[str, Any]:
        """Compare the arms of ``route``'s pilot (default: its latest)."""
        require_reader(who)
        with self.registry.reading() as s:
            self._route(s, who, route)
            query = select(Pilot).where(Pilot.route == route)
            row = s.get(Pilot, pilot) if pilot is not None else s.scalars(query.order_by(Pilot.id.desc())).first()
            if row is None or row.route != route:
                raise ReleaseError(
                    f"route {route!r} has no pilot{f' {pilot}' if pilot else ''}", status=404, code="no_pilot"
                )
            records = requests(s, UsageRecord.pilot_id == row.id)
            return compare(_step(row).to_json() | _times(row), records)


def _times(row: Pilot) -> dict[str, Any]:
    return {"started_at": row.started_at, "ended_at": row.ended_at, "reason": row.reason, "actor": row.actor}


def compare(pilot: dict[str, Any], records: Sequence[Any]) -> dict[str, Any]:
    """The pilot report of ``records`` (``monitor.requests`` rows: arm, user, status, latency,
    tokens, cost, refusal, feedback score of each request of the pilot)."""
    by_arm: dict[str, list[Any]] = {arm: [] for arm in ARMS}
    for r in records:
        if r.arm in by_arm:
            by_arm[r.arm].append(r)
    arms = {arm: figures(rows) for arm, rows in by_arm.items()}
    groups = {arm: clusters(rows) for arm, rows in by_arm.items()}
    comparison: dict[str, Any] = {}
    if all(groups[a] for a in ARMS):
        score = cluster_bootstrap_difference(groups[CONTROL], groups[CHALLENGER])
        comparison["score"] = score.to_json()
    c, t = arms[CONTROL], arms[CHALLENGER]
    for name in ("refusal_rate", "error_rate", "feedback_rate"):
        comparison[name] = round(t[name]["value"] - c[name]["value"], 6)
    comparison["latency_p50_s"] = _delta(t["latency_p50_s"], c["latency_p50_s"])
    comparison["cost_per_request"] = _delta(t["cost_per_request"], c["cost_per_request"])
    return {
        "object": "pilot.report",
        "pilot": pilot,
        "arms": arms,
        "comparison": comparison,
        "verdict": verdict(pilot, arms, comparison),
    }


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 6)


def verdict(pilot: dict[str, Any], arms: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> str:
    """One sentence a manager can act on."""
    score = comparison.get("score")
    few = [a for a in ARMS if arms[a]["feedback"] < MIN_FEEDBACK]
    if score is None:
        return "No feedback in one of the arms yet: nothing to compare."
    diff, low, high = score["value"], score["low"], score["high"]
    span = f"{diff:+.3f} (95% interval {low:+.3f} to {high:+.3f}, p={score['p_value']:.3g})"
    if score["significant"]:
        better = "better" if diff > 0 else "worse"
        text = f"The challenger {pilot['challenger']} scores {better} than the control {pilot['control']}: {span}."
    else:
        text = f"No significant difference in score between the arms: {span}."
    if few:
        text += f" Fewer than {MIN_FEEDBACK} ratings in the {' and '.join(few)} arm: keep collecting."
    return text
