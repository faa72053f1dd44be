"""The review queue: every request a guard check blocked or flagged, for a person to judge.

The server adds an entry (``Reviews.add``) with the request's id, tenant, model, check, score and
the message that fired, personal data and secrets replaced by placeholders. Admins and auditors
of the tenant (or global ones) list and read them; an admin resolves one with a decision and a
reason, audited. Nothing is deleted, and a resolved entry stays resolved.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select

from loraforge.data.pii import Redactor
from loraforge.data.scan import scan_text
from loraforge.errors import ReleaseError
from loraforge.govern.audit import AuditLog
from loraforge.govern.pilot import require_reader
from loraforge.govern.release import Principal, audited, in_scope, require_admin
from loraforge.registry.database import Registry
from loraforge.registry.schema import GuardReview

EXCERPT = 1000  # characters of the message kept for the reviewer
DECISIONS = ("attack", "false_positive", "unclear")
STATUSES = ("open", "resolved")


def redacted_excerpt(text: str) -> str:
    """``text`` with personal data and secrets replaced by placeholders, cut to ``EXCERPT`` characters."""
    clean = Redactor(text).redact(text, scan_text(text))
    return clean if len(clean) <= EXCERPT else clean[: EXCERPT - 1] + "…"


def _json(row: GuardReview) -> dict[str, Any]:
    return {
        "id": row.id,
        "request_id": row.request_id,
        "tenant": row.tenant,
        "key_id": row.key_id,
        "model": row.model,
        "check": row.check,
        "action": row.action,
        "score": row.score,
        "threshold": row.threshold,
        "role": row.role,
        "message": row.message,
        "excerpt": row.excerpt,
        "created_at": row.created_at,
        "status": row.status,
        "decision": row.decision,
        "reason": row.reason,
        "resolved_by": row.resolved_by,
        "resolved_at": row.resolved_at,
    }


class Reviews:
    """The review queue on ``registry``; resolutions are recorded in ``audit``."""

    def __init__(self, registry: Registry, audit: AuditLog | None = None) -> None:
        self.registry = registry
        self.audit = audit

    def add(
        self,
        *,
        request_id: str,
        tenant: str,
        key_id: str,
        model: str,
        check: str,
        action: str,
        score: float,
        threshold: float,
        role: str,
        message: int,
        text: str,
    ) -> int:
        """Queue a block or flag for review; returns its id. The text is redacted here."""
        with self.registry.session() as s:
            row = GuardReview(
                request_id=request_id,
                tenant=tenant,
                key_id=key_id,
                model=model,
                check=check,
                action=action,
                score=score,
                threshold=threshold,
                role=role,
                message=message,
                excerpt=redacted_excerpt(text),
                created_at=time.time(),
                status="open",
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def list(
        self, who: Principal, *, status: str | None = "open", tenant: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """The newest entries ``who`` may read (its tenant's, or all for a global key), and counts."""
        require_reader(who, "reviews")
        if status is not None and status not in STATUSES:
            raise ReleaseError(f"status must be one of {', '.join(STATUSES)}", status=400, code="invalid_status")
        query = select(GuardReview)
        counting = select(GuardReview.status, func.count()).group_by(GuardReview.status)
        scope = tenant if who.all_tenants else who.tenant
        if scope is not None:
            query = query.where(GuardReview.tenant == scope)
            counting = counting.where(GuardReview.tenant == scope)
        if status is not None:
            query = query.where(GuardReview.status == status)
        with self.registry.reading() as s:
            rows = s.scalars(query.order_by(GuardReview.id.desc()).limit(max(1, min(limit, 1000)))).all()
            counts = {str(k): int(v) for k, v in s.execute(counting).all()}
            return {"data": [_json(r) for r in rows], "counts": {k: counts.get(k, 0) for k in STATUSES}}

    def get(self, who: Principal, review_id: int) -> dict[str, Any]:
        require_reader(who, "reviews")
        with self.registry.reading() as s:
            return _json(self._row(s, who, review_id))

    def resolve(self, who: Principal, review_id: int, decision: str, reason: str) -> dict[str, Any]:
        """Record ``who``'s decision on an open entry (an admin's key), audited as ``review.resolve``.

        Raises:
            ReleaseError: not an admin (403), not this key's (404), already resolved (409), a
                decision not in ``DECISIONS`` or no reason (400).
        """
        require_admin(who, "resolving a review")
        if decision not in DECISIONS:
            raise ReleaseError(f"decision must be one of {', '.join(DECISIONS)}", status=400, code="invalid_decision")
        if not reason or not reason.strip():
            raise ReleaseError("a review is resolved with a reason", status=400, code="reason_required")

        def step() -> dict[str, Any]:
            with self.registry.session() as s:
                row = self._row(s, who, review_id)
                if row.status != "open":
                    raise ReleaseError(
                        f"review {review_id} was resolved already ({row.decision}, by {row.resolved_by})",
                        status=409,
                        code="already_resolved",
                    )
                row.status, row.decision, row.reason = "resolved", decision, reason.strip()
                row.resolved_by = f"key:{who.id}" + (f" ({who.owner})" if who.owner else "")
                row.resolved_at = time.time()
                return _json(row)

        return audited(self.audit, who, "review.resolve", f"review:{review_id}", step, decision=decision, reason=reason)

    def _row(self, s: Any, who: Principal, review_id: int) -> GuardReview:
        row = s.get(GuardReview, review_id)
        if row is None or not in_scope(who, row.tenant):
            raise ReleaseError(f"no review {review_id} for this key", status=404, code="review_not_found")
        return row  # type: ignore[no-any-return]
