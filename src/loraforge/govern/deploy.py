"""Deployments: a route (a model name clients use, such as ``support-bot``) bound to an approved adapter.

A route belongs to the owner of the first adapter deployed under it (a tenant, or public) and only
ever serves adapters of that owner. Deploying binds it to an ``approved`` adapter (which becomes
``deployed``); the adapter it replaces goes back to ``approved`` unless another route still serves
it. Rolling back restores the deployment the current one replaced, in one transaction: a server
resolves the route on every request, so the switch takes effect at the next request without a
restart, and requests already running finish on the adapter they started with.

Each route's history is the ``deployments`` table: every binding with its actor, reason, start and
end. A rollback's own ``previous_id`` is the one its restored deployment had, so rolling back twice
goes two steps back, not back and forth.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.errors import ReleaseError
from loraforge.govern.audit import AuditLog
from loraforge.govern.release import Principal, actor_name, audited, in_scope, record, require_admin, routes_serving
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter, Deployment, Pilot, Route, ensure_tenant, valid_name

DEPLOYABLE = ("approved", "deployed")
CONTROL = "control"
CHALLENGER = "challenger"
DRAWS = 10_000  # a pilot's assignment resolution: percent × 100 of the draws go to the challenger


@dataclass(frozen=True)
class PilotArm:
    """A running pilot, as a request resolves it."""

    id: int
    adapter: str  # the challenger
    percent: int

    def arm(self, user: str | None) -> str:
        """The arm of ``user``: always the same in this pilot; random for a request without a user id."""
        if user is None:
            draw = secrets.randbelow(DRAWS)
        else:
            digest = hashlib.sha256(f"{self.id}\x00{user}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") % DRAWS
        return CHALLENGER if draw < self.percent * DRAWS // 100 else CONTROL


@dataclass(frozen=True)
class Binding:
    """Where a route points now."""

    route: str
    tenant: str | None
    adapter: str
    deployment: int
    pilot: PilotArm | None = None  # a running pilot sends some end users to its challenger

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "route": self.route,
            "tenant": self.tenant,
            "adapter": self.adapter,
            "deployment": self.deployment,
        }
        if self.pilot is not None:
            out["pilot"] = {"id": self.pilot.id, "challenger": self.pilot.adapter, "percent": self.pilot.percent}
        return out

    def choose(self, user: str | None) -> tuple[str, str | None]:
        """The adapter that answers ``user`` and its pilot arm (None without a pilot)."""
        if self.pilot is None:
            return self.adapter, None
        arm = self.pilot.arm(user)
        return (self.pilot.adapter if arm == CHALLENGER else self.adapter), arm


def active(s: Session, route: str) -> Deployment | None:
    return s.scalars(select(Deployment).where(Deployment.route == route, Deployment.ended_at.is_(None))).first()


def running_pilot(s: Session, route: str) -> Pilot | None:
    """The pilot ``route`` runs now, if any."""
    return s.scalars(select(Pilot).where(Pilot.route == route, Pilot.ended_at.is_(None))).first()


def _no_pilot(s: Session, route: str) -> None:
    if running_pilot(s, route) is not None:
        raise ReleaseError(
            f"route {route!r} runs a pilot; stop or promote it first (`loraforge pilot stop|promote {route}`)",
            status=409,
            code="pilot_running",
        )


def resolve(registry: Registry, name: str) -> Binding | None:
    """The adapter the route ``name`` serves now, or None when no route has that name (or it serves nothing)."""
    with registry.reading() as s:
        route = s.get(Route, name)
        if route is None:
            return None
        current = active(s, name)
        if current is None:
            return None
        pilot = running_pilot(s, name)
        arm = PilotArm(pilot.id, pilot.adapter, pilot.percent) if pilot is not None else None
        return Binding(name, route.tenant, current.adapter, current.id, arm)


def bindings(registry: Registry) -> list[Binding]:
    """Every route that serves an adapter now, with its running pilot."""
    with registry.reading() as s:
        rows = s.execute(
            select(Route.name, Route.tenant, Deployment.adapter, Deployment.id)
            .join(Deployment, Deployment.route == Route.name)
            .where(Deployment.ended_at.is_(None))
            .order_by(Route.name)
        ).all()
        pilots = {
            p.route: PilotArm(p.id, p.adapter, p.percent)
            for p in s.scalars(select(Pilot).where(Pilot.ended_at.is_(None)))
        }
    return [
        Binding(route, tenant, adapter, deployment, pilots.get(route)) for route, tenant, adapter, deployment in rows
    ]


class Deployments:
    """Deploy and roll back routes on ``registry``, each checked the same way for the CLI and the API.

    Args:
        reserved: names a route may not take (the base models served), besides adapter names.
    """

    def __init__(self, registry: Registry, audit: AuditLog | None = None, reserved: set[str] | None = None) -> None:
        self.registry = registry
        self.audit = audit
        self.reserved = reserved or set()

    def deploy(self, who: Principal, route: str, adapter: str, *, reason: str | None = None) -> Binding:
        """Bind ``route`` (created on first use) to the approved ``adapter``.

        Raises:
            ReleaseError: not an admin key; the adapter is not this key's, not approved, or of
                another owner than the route; the route's name is an adapter's or a base model's.
        """
        return audited(
            self.audit,
            who,
            "route.deploy",
            route,
            lambda: self._deploy(who, route, adapter, reason),
            adapter=adapter,
            reason=reason,
        )

    def _deploy(self, who: Principal, route: str, adapter: str, reason: str | None) -> Binding:
        require_admin(who, "deploying")
        if not valid_name(route):
            raise ReleaseError(
                f"route name {route!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'",
                status=400,
                code="bad_name",
            )
        now = time.time()
        with self.registry.session() as s:
            row = s.get(Adapter, adapter)
            if row is None or not in_scope(who, row.tenant):
                raise ReleaseError(f"no adapter {adapter!r} for this key", status=404, code="adapter_not_found")
            if row.state not in DEPLOYABLE:
                raise ReleaseError(
                    f"{adapter!r} is {row.state}; only an approved adapter can be deployed "
                    "(`loraforge approve` needs an approver's key)",
                    status=409,
                    code="not_approved",
                )
            if route in self.reserved or s.get(Adapter, route) is not None:
                raise ReleaseError(
                    f"{route!r} is the name of a model or adapter; a route needs a name of its own",
                    status=409,
                    code="name_taken",
                )
            bound = s.get(Route, route)
            if bound is None:
                if row.tenant is not None:
                    ensure_tenant(s, row.tenant, now)
                bound = Route(name=route, tenant=row.tenant, created_by=actor_name(who), created_at=now)
                s.add(bound)
                s.flush()
            elif not in_scope(who, bound.tenant):
                raise ReleaseError(f"no route {route!r} for this key", status=404, code="route_not_found")
            if bound.tenant != row.tenant:
                owner = bound.tenant or "public"
                raise ReleaseError(
                    f"route {route!r} serves adapters of {owner}; {adapter!r} belongs to {row.tenant or 'public'}",
                    status=409,
                    code="other_owner",
                )
            _no_pilot(s, route)
            current = active(s, route)
            if current is not None and current.adapter == adapter:
                raise ReleaseError(f"{route!r} serves {adapter!r} already", status=409, code="already_deployed")
            return self.switch(s, who, bound, current, adapter, "deploy", current.id if current else None, reason)

    def rollback(self, who: Principal, route: str, *, reason: str | None = None) -> Binding:
        """Restore the adapter the route served before its current deployment.

        Raises:
            ReleaseError: not an admin key; no such route for this key; nothing to roll back to;
                the earlier adapter was retired since.
        """
        return audited(
            self.audit, who, "route.rollback", route, lambda: self._rollback(who, route, reason), reason=reason
        )

    def _rollback(self, who: Principal, route: str, reason: str | None) -> Binding:
        require_admin(who, "rolling back")
        with self.registry.session() as s:
            bound = s.get(Route, route)
            if bound is None or not in_scope(who, bound.tenant):
                raise ReleaseError(f"no route {route!r} for this key", status=404, code="route_not_found")
            _no_pilot(s, route)
            current = active(s, route)
            previous = s.get(Deployment, current.previous_id) if current and current.previous_id else None
            if current is None or previous is None:
                raise ReleaseError(
                    f"route {route!r} has no earlier deployment to roll back to",
                    status=409,
                    code="nothing_to_roll_back",
                )
            target = s.get(Adapter, previous.adapter)
            if target is None or target.state not in DEPLOYABLE:
                state = "removed" if target is None else target.state
                raise ReleaseError(
                    f"the earlier adapter {previous.adapter!r} is {state}; deploy an approved adapter instead",
                    status=409,
                    code="not_approved",
                )
            return self.switch(s, who, bound, current, previous.adapter, "rollback", previous.previous_id, reason)

    def switch(
        self,
        s: Session,
        who: Principal,
        route: Route,
        current: Deployment | None,
        adapter: str,
        action: str,
        previous_id: int | None,
        reason: str | None,
    ) -> Binding:
        now = time.time()
        actor = actor_name(who)
        if current is not None:
            current.ended_at = now
            s.flush()
        new = Deployment(
            route=route.name,
            adapter=adapter,
            action=action,
            previous_id=previous_id,
            actor=actor,
            reason=reason,
            created_at=now,
        )
        s.add(new)
        s.flush()
        details = {"route": route.name, "deployment": new.id}
        target = s.get(Adapter, adapter)
        assert target is not None
        if target.state != "deployed":
            record(
                s,
                target,
                action,
                "deployed",
                actor=actor,
                key_id=who.id,
                owner=who.owner,
                reason=reason,
                details=details,
            )
        if current is not None and current.adapter != adapter and not routes_serving(s, current.adapter):
            replaced = s.get(Adapter, current.adapter)
            if replaced is not None and replaced.state == "deployed":
                record(
                    s,
                    replaced,
                    "undeploy",
                    "approved",
                    actor=actor,
                    key_id=who.id,
                    owner=who.owner,
                    reason=reason,
                    details=details,
                )
        return Binding(route.name, route.tenant, adapter, new.id)

    def history(self, who: Principal, route: str) -> list[dict[str, Any]]:
        """Every deployment of ``route``, oldest first."""
        with self.registry.reading() as s:
            bound = s.get(Route, route)
            if bound is None or not in_scope(who, bound.tenant):
                raise ReleaseError(f"no route {route!r} for this key", status=404, code="route_not_found")
            rows = s.scalars(select(Deployment).where(Deployment.route == route).order_by(Deployment.id)).all()
            return [
                {
                    "deployment": r.id,
                    "adapter": r.adapter,
                    "action": r.action,
                    "actor": r.actor,
                    "reason": r.reason,
                    "created_at": r.created_at,
                    "ended_at": r.ended_at,
                }
                for r in rows
            ]
