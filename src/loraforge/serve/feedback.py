"""End users' feedback on answers: ``POST /v1/feedback`` with a response's id and a rating.

A rating is thumbs (``"up"`` / ``"down"``, scored 1 / 0) or stars (1 to 5, scored (r-1)/4), with an
optional comment; it belongs to the request it names, which must be an answered request of the
key's own tenant (another tenant's id answers as a missing one). Rating a response again replaces
its rating. Pilots (``govern.pilot``) compare their arms on these scores; ``loraforge monitor``
shows them over time; Prometheus counts them per model and adapter.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from loraforge.registry.database import Registry
from loraforge.registry.schema import Feedback, UsageRecord
from loraforge.serve.api_errors import APIError
from loraforge.serve.keys import KeyRecord
from loraforge.serve.observe import BASE
from loraforge.serve.telemetry import Metrics

PREFIXES = ("chatcmpl-", "cmpl-")
MAX_COMMENT = 2000


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="the response's id (chatcmpl-… or cmpl-…)")
    rating: Literal["up", "down"] | StrictInt = Field(description='"up", "down", or 1 to 5 stars')
    comment: str | None = Field(None, max_length=MAX_COMMENT)


def score(rating: str | int) -> tuple[int, str, float]:
    """``(rating as stored, scale, score on 0..1)``.

    Raises:
        APIError: a number of stars outside 1..5.
    """
    if rating == "up":
        return 1, "thumbs", 1.0
    if rating == "down":
        return 0, "thumbs", 0.0
    if isinstance(rating, int) and 1 <= rating <= 5:
        return rating, "stars", (rating - 1) / 4
    raise APIError(400, f'rating is "up", "down" or 1 to 5 stars; got {rating!r}', param="rating", code="bad_rating")


class FeedbackBook:
    """Where ratings are kept (the registry's ``feedback`` table) and counted (``metrics``)."""

    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def rate(self, key: KeyRecord, body: FeedbackBody) -> dict[str, Any]:
        """Record ``body``'s rating of one of ``key``'s tenant's responses (a new rating replaces the old)."""
        rating, scale, value = score(body.rating)
        request_id = body.id
        for prefix in PREFIXES:
            request_id = request_id.removeprefix(prefix)
        try:
            model, adapter, first = self._write(key, body, request_id, rating, scale, value)
        except IntegrityError:  # the same response rated at the same moment by another request: update it
            model, adapter, first = self._write(key, body, request_id, rating, scale, value)
        if first:  # a changed rating is not counted twice
            self.metrics.feedback.labels(model, adapter).observe(value)
        return {
            "object": "feedback",
            "id": body.id,
            "rating": body.rating,
            "score": value,
            "model": model,
            "replaced": not first,
        }

    def _write(
        self, key: KeyRecord, body: FeedbackBody, request_id: str, rating: int, scale: str, value: float
    ) -> tuple[str, str, bool]:
        """Insert or replace the rating; returns the response's model, adapter and whether it is new."""
        with self.registry.session() as s:
            usage = s.scalars(
                select(UsageRecord).where(UsageRecord.request_id == request_id, UsageRecord.tenant == key.tenant)
            ).first()
            if usage is None:
                raise APIError(
                    404,
                    f"no response {body.id!r} of this tenant (the id is the response's 'id' field)",
                    param="id",
                    code="response_not_found",
                )
            if usage.status >= 400:
                raise APIError(409, f"response {body.id!r} failed ({usage.status}): nothing to rate", code="no_answer")
            row = s.scalars(select(Feedback).where(Feedback.request_id == request_id)).first()
            first = row is None
            if row is None:
                row = Feedback(request_id=request_id, tenant=key.tenant)
                s.add(row)
            row.key_id = key.id
            row.rating, row.scale, row.score = rating, scale, value
            row.comment = body.comment
            row.created_at = time.time()
            return usage.model, usage.adapter or BASE, first
