"""The release of an adapter: its lifecycle, approvals with separation of duties, and retirement.

States, stored in ``adapters.state``; every step is a row of ``adapter_transitions`` (actor, time,
reason) and a record of the audit log::

    draft ──evaluate──▶ evaluated ──approve × N distinct approvers──▶ approved ──deploy──▶ deployed
      ▲                     │                                             ▲                    │
      └──────reject─────────┘ (also from approved)                        └─replaced on its routes┘
    any state but deployed ──retire──▶ retired (never served, approved or deployed again)

Who may do what (the key's ``role``; a key acts for its own tenant unless it is ``--global``; a
public adapter needs a global key)::

    approve, reject        approver
    deploy, rollback,
    retire, policy         admin
    read (history, report) admin, approver, auditor

Rules of approval, checked in this order (:func:`approval_problem`, the table the tests drive):
the key is an approver's, the adapter is in its scope and ``evaluated`` (or ``approved`` with
approvals still missing), its creator is neither this key nor this key's owner (separation of
duties), this approver (key or owner) has not approved it already in this round, and an evaluation
that did not PASS the release gate is approved only with an override carrying a written reason. A
policy (``release_policies``) may require more than one approver; the adapter is ``approved`` when
the last one signs. A rejection ends the round: the adapter goes back to ``draft``, and only a new
registration (with a new evaluation) starts another.

Deployments (routes a client calls by name) are in ``govern.deploy``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.errors import ReleaseError
from loraforge.govern.audit import AuditLog
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter, AdapterTransition, Deployment, Evaluation, Pilot, ReleasePolicy

STATES = ("draft", "evaluated", "approved", "deployed", "retired")
ROLES = ("user", "developer", "approver", "auditor", "admin")  # "user": a developer key of older versions
READERS = ("admin", "approver", "auditor")
DEFAULT_SCOPE = "*"
MAX_APPROVALS = 5
PASS = "PASS"
T = TypeVar("T")


class Principal(Protocol):
    """Who acts: an API key's record (``serve.keys.KeyRecord``), or the CLI acting with one."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def all_tenants(self) -> bool: ...
    @property
    def owner(self) -> str | None: ...


def actor_name(who: Principal) -> str:
    """How the audit log and the history name ``who``: ``key:ID`` (and its owner)."""
    return f"key:{who.id}" + (f" ({who.owner})" if who.owner else "")


def creator(who: Principal | None, fallback: str) -> dict[str, Any]:
    """The ``created_by`` record of an adapter or job: the key (and its owner), else ``fallback`` (``cli:USER``)."""
    if who is None:
        return {"actor": fallback, "key": None, "owner": fallback.removeprefix("cli:") if fallback else None}
    return {"actor": actor_name(who), "key": who.id, "owner": who.owner}


@dataclass(frozen=True)
class Approval:
    key_id: str | None
    owner: str | None
    override: bool


@dataclass(frozen=True)
class ApprovalCase:
    """What :func:`approval_problem` decides on: the approver, the adapter, and the round so far."""

    role: str
    in_scope: bool
    state: str
    verdict: str | None  # the latest evaluation's, None when never evaluated
    created_by: dict[str, Any]
    key_id: str
    owner: str | None
    approvals: Sequence[Approval]  # of this round
    required: int
    override_reason: str | None


def approval_problem(case: ApprovalCase) -> ReleaseError | None:
    """Why this approval must be refused, or None when it may be recorded (see the module's rules)."""
    if case.role != "approver":
        return ReleaseError("approving needs an approver's key (role approver)", status=403, code="approver_required")
    if not case.in_scope:
        return ReleaseError("no such adapter for this key", status=404, code="adapter_not_found")
    if case.state == "draft":
        return ReleaseError(
            "the adapter has no evaluation yet: evaluate it (`loraforge eval`) and register it again, then approve",
            status=409,
            code="not_evaluated",
        )
    if case.state in ("retired", "deployed") or (case.state == "approved" and len(case.approvals) >= case.required):
        return ReleaseError(f"the adapter is {case.state}; there is nothing to approve", status=409, code="bad_state")
    made_by = case.created_by or {}
    if made_by.get("key") == case.key_id or (case.owner and case.owner == made_by.get("owner")):
        return ReleaseError(
            f"separation of duties: {made_by.get('actor') or 'this key'} created the adapter, so it cannot approve it; "
            "another approver must",
            status=403,
            code="separation_of_duties",
        )
    for earlier in case.approvals:
        if earlier.key_id == case.key_id or (case.owner and earlier.owner == case.owner):
            return ReleaseError(
                f"this approver has approved it already; {case.required} distinct approvers are required",
                status=409,
                code="already_approved",
            )
    if case.verdict != PASS and not (case.override_reason or "").strip():
        return ReleaseError(
            f"its evaluation did not pass the release gate (verdict {case.verdict}); approve it only with an "
            'override that gives the reason (--override REASON, or "override" in the request)',
            status=400,
            code="gate_override_required",
        )
    return None


@dataclass(frozen=True)
class Step:
    """The result of a release step: the adapter's new state and what the round still needs."""

    adapter: str
    state: str
    approvals: int = 0
    required: int = 0
    override: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "state": self.state,
            "approvals": self.approvals,
            "approvals_required": self.required,
            "release_override": self.override,
        }


def in_scope(who: Principal, tenant: str | None) -> bool:
    """Whether ``who`` acts for the owner ``tenant`` (None: public, reached by global keys only)."""
    return who.all_tenants or (tenant is not None and tenant == who.tenant)


def record(
    s: Session,
    adapter: Adapter,
    action: str,
    to_state: str,
    *,
    actor: str,
    key_id: str | None = None,
    owner: str | None = None,
    reason: str | None = None,
    override: bool = False,
    details: dict[str, Any] | None = None,
) -> None:
    """Move ``adapter`` to ``to_state`` and write the step to its history (in the caller's transaction)."""
    s.add(
        AdapterTransition(
            adapter=adapter.name,
            action=action,
            from_state=adapter.state,
            to_state=to_state,
            actor=actor,
            key_id=key_id,
            owner=owner,
            reason=reason,
            override=override,
            details=details,
            created_at=time.time(),
        )
    )
    adapter.state = to_state


def routes_serving(s: Session, adapter: str) -> list[str]:
    """The routes that send requests to ``adapter`` now: deployed on them, or their running pilot's challenger."""
    deployed = s.scalars(select(Deployment.route).where(Deployment.adapter == adapter, Deployment.ended_at.is_(None)))
    piloted = s.scalars(select(Pilot.route).where(Pilot.adapter == adapter, Pilot.ended_at.is_(None)))
    return sorted({*deployed, *piloted})


def latest_evaluation(s: Session, name: str) -> Evaluation | None:
    return s.scalars(
        select(Evaluation)
        .where(Evaluation.adapter == name)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
    ).first()


def round_approvals(s: Session, name: str) -> list[Approval]:
    """The approvals since the adapter last entered ``evaluated`` (a rejection or re-registration ends a round)."""
    rows = s.scalars(
        select(AdapterTransition).where(AdapterTransition.adapter == name).order_by(AdapterTransition.id)
    ).all()
    out: list[Approval] = []
    for row in rows:
        if row.action in ("register", "evaluate", "reject"):
            out = []
        elif row.action == "approve":
            out.append(Approval(row.key_id, row.owner, row.override))
    return out


def required_approvals(s: Session, tenant: str | None) -> int:
    """The approvals a tenant's adapters need: its policy, else the ``*`` policy, else 1."""
    for scope in ([tenant] if tenant else []) + [DEFAULT_SCOPE]:
        policy = s.get(ReleasePolicy, scope)
        if policy is not None:
            return policy.approvals_required
    return 1


def history(s: Session, name: str) -> list[dict[str, Any]]:
    rows = s.scalars(
        select(AdapterTransition).where(AdapterTransition.adapter == name).order_by(AdapterTransition.id)
    ).all()
    return [
        {
            "action": r.action,
            "from_state": r.from_state,
            "to_state": r.to_state,
            "actor": r.actor,
            "reason": r.reason,
            "override": r.override,
            "details": r.details or {},
            "created_at": r.created_at,
        }
        for r in rows
    ]


def audited(
    audit: AuditLog | None, who: Principal, action: str, target: str, step: Callable[[], T], **details: Any
) -> T:
    """Run ``step`` as an audited action of ``who``: its intent before, its outcome (or refusal) after."""
    if audit is None:
        return step()
    with audit.action(actor_name(who), action, target, role=who.role, **details) as act:
        result = step()
        if hasattr(result, "to_json"):
            act.outcome.update(result.to_json())
        return result


class Release:
    """The release steps on ``registry``, each checked and audited the same way for the CLI and the API.

    Args:
        audit: where every step, and every refusal, is recorded (None: not recorded, for tests).
    """

    def __init__(self, registry: Registry, audit: AuditLog | None = None) -> None:
        self.registry = registry
        self.audit = audit

    def _adapter(self, s: Session, who: Principal, name: str) -> Adapter:
        row = s.get(Adapter, name)
        if row is None or not in_scope(who, row.tenant):
            raise ReleaseError(f"no adapter {name!r} for this key", status=404, code="adapter_not_found")
        return row

    def approve(self, who: Principal, name: str, *, reason: str | None = None, override: str | None = None) -> Step:
        """Record ``who``'s approval; the adapter is ``approved`` once the policy's approvers have all signed.

        Raises:
            ReleaseError: refused by :func:`approval_problem` (nothing is recorded but the refusal's audit).
        """
        return audited(
            self.audit,
            who,
            "adapter.approve",
            name,
            lambda: self._approve(who, name, reason, override),
            reason=reason,
            override=override,
        )

    def _approve(self, who: Principal, name: str, reason: str | None, override: str | None) -> Step:
        with self.registry.session() as s:
            row = s.get(Adapter, name)
            approvals = round_approvals(s, name) if row is not None else []
            evaluation = latest_evaluation(s, name) if row is not None else None
            required = required_approvals(s, row.tenant) if row is not None else 1
            problem = approval_problem(
                ApprovalCase(
                    role=who.role,
                    in_scope=row is not None and in_scope(who, row.tenant),
                    state=row.state if row is not None else "draft",
                    verdict=evaluation.verdict if evaluation is not None else None,
                    created_by=(row.created_by if row is not None else None) or {},
                    key_id=who.id,
                    owner=who.owner,
                    approvals=approvals,
                    required=required,
                    override_reason=override,
                )
            )
            if problem is not None:
                raise problem
            assert row is not None and evaluation is not None
            overriding = evaluation.verdict != PASS
            done = len(approvals) + 1 >= required
            details = {"verdict": evaluation.verdict, "approval": len(approvals) + 1, "required": required}
            text = (override if overriding else reason) or reason
            record(
                s,
                row,
                "approve",
                "approved" if done else row.state,
                actor=actor_name(who),
                key_id=who.id,
                owner=who.owner,
                reason=text.strip() if text else None,
                override=overriding,
                details=details,
            )
            if overriding:
                row.release_override = (override or "").strip()
            return Step(name, row.state, len(approvals) + 1, required, row.release_override)

    def reject(self, who: Principal, name: str, *, reason: str) -> Step:
        """Reject the adapter: back to ``draft``, the round's approvals void; a reason is required."""
        return audited(self.audit, who, "adapter.reject", name, lambda: self._reject(who, name, reason), reason=reason)

    def _reject(self, who: Principal, name: str, reason: str) -> Step:
        if who.role != "approver":
            raise ReleaseError(
                "rejecting needs an approver's key (role approver)", status=403, code="approver_required"
            )
        if not reason.strip():
            raise ReleaseError("a rejection needs a reason", status=400, code="reason_required")
        with self.registry.session() as s:
            row = self._adapter(s, who, name)
            if row.state not in ("evaluated", "approved"):
                raise ReleaseError(
                    f"the adapter is {row.state}; only an evaluated or approved one can be rejected"
                    + (" (roll its route back or deploy another first)" if row.state == "deployed" else ""),
                    status=409,
                    code="bad_state",
                )
            record(s, row, "reject", "draft", actor=actor_name(who), key_id=who.id, owner=who.owner, reason=reason)
            row.release_override = None
            return Step(name, row.state)

    def retire(self, who: Principal, name: str, *, reason: str) -> Step:
        """Retire the adapter for good: it is never served, approved or deployed again."""
        return audited(self.audit, who, "adapter.retire", name, lambda: self._retire(who, name, reason), reason=reason)

    def _retire(self, who: Principal, name: str, reason: str) -> Step:
        require_admin(who, "retiring an adapter")
        if not reason.strip():
            raise ReleaseError("retiring needs a reason", status=400, code="reason_required")
        with self.registry.session() as s:
            row = self._adapter(s, who, name)
            if row.state == "retired":
                raise ReleaseError("the adapter is retired already", status=409, code="bad_state")
            serving = routes_serving(s, name)
            if serving:
                raise ReleaseError(
                    f"the adapter is deployed on {', '.join(serving)}; deploy another adapter there or roll back first",
                    status=409,
                    code="deployed",
                )
            record(s, row, "retire", "retired", actor=actor_name(who), key_id=who.id, owner=who.owner, reason=reason)
            return Step(name, row.state)

    def set_policy(self, who: Principal, tenant: str | None, approvals: int) -> int:
        """Require ``approvals`` distinct approvers for ``tenant``'s adapters (None: the default for all)."""
        return audited(
            self.audit,
            who,
            "release.policy",
            tenant or DEFAULT_SCOPE,
            lambda: self._set_policy(who, tenant, approvals),
            approvals_required=approvals,
        )

    def _set_policy(self, who: Principal, tenant: str | None, approvals: int) -> int:
        require_admin(who, "setting a release policy")
        if tenant is None and not who.all_tenants:
            raise ReleaseError(
                "the default policy needs an admin key for all tenants", status=403, code="admin_required"
            )
        if tenant is not None and not in_scope(who, tenant):
            raise ReleaseError(f"no tenant {tenant!r} for this key", status=404, code="tenant_not_found")
        if not 1 <= approvals <= MAX_APPROVALS:
            raise ReleaseError(f"approvals must be 1 to {MAX_APPROVALS}, not {approvals}", status=400, code="bad_value")
        with self.registry.session() as s:
            s.merge(
                ReleasePolicy(
                    scope=tenant or DEFAULT_SCOPE,
                    approvals_required=approvals,
                    updated_by=actor_name(who),
                    updated_at=time.time(),
                )
            )
        return approvals

    def status(self, who: Principal, name: str) -> dict[str, Any]:
        """The adapter's release state, approvals of this round, latest verdict and history."""
        if who.role not in (*READERS, "developer", "user"):
            raise ReleaseError("this key cannot read release records", status=403, code="forbidden")
        with self.registry.reading() as s:
            row = self._adapter(s, who, name)
            evaluation = latest_evaluation(s, name)
            return {
                "adapter": name,
                "tenant": row.tenant,
                "state": row.state,
                "created_by": row.created_by,
                "verdict": evaluation.verdict if evaluation is not None else None,
                "approvals": len(round_approvals(s, name)) if row.state in ("evaluated", "approved") else 0,
                "approvals_required": required_approvals(s, row.tenant),
                "release_override": row.release_override,
                "governance_override": row.governance_override,
                "routes": routes_serving(s, name),
                "history": history(s, name),
            }


def require_admin(who: Principal, what: str) -> None:
    if who.role != "admin":
        raise ReleaseError(f"{what} needs an admin key", status=403, code="admin_required")


def register_step(
    s: Session, row: Adapter, verdict: str | None, *, actor: str, evaluation_id: str | None = None
) -> None:
    """The first steps of a newly registered adapter: ``register`` (draft), then ``evaluate`` when it
    carries a verdict (the caller has added its ``evaluations`` row)."""
    replaced = row.state if row.state in STATES and row.state != "draft" else None
    record(s, row, "register", "draft", actor=actor, details={"replaced_state": replaced} if replaced else None)
    row.release_override = None
    if verdict:
        record(s, row, "evaluate", "evaluated", actor=actor, details={"verdict": verdict, "evaluation": evaluation_id})
