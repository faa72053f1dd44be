"""Metering: every request's tokens and cost, per tenant, kept in the registry (``usage_records``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from loraforge.registry.database import Registry
from loraforge.registry.schema import UsageRecord
from loraforge.serve.home_registry import home_registry


class UsageLedger:
    """Records one row per finished request; totals are summed by the database when asked for.

    Args:
        registry: the registry to use (default: ``home``'s).
    """

    def __init__(
        self,
        home: Path,
        *,
        price_prompt_1k: float,
        price_completion_1k: float,
        registry: Registry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else home_registry(home)
        self.price_prompt_1k = price_prompt_1k
        self.price_completion_1k = price_completion_1k

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return round(
            prompt_tokens / 1000 * self.price_prompt_1k + completion_tokens / 1000 * self.price_completion_1k, 8
        )

    def record(
        self,
        *,
        request_id: str,
        tenant: str,
        key_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        **monitoring: Any,
    ) -> dict[str, Any]:
        """Record one finished request; ``monitoring`` are the other columns of ``UsageRecord``
        (adapter, route, pilot_id, arm, user_hash, status, latency_s, refusal, novelty, unfamiliar)."""
        entry = {
            "ts": round(time.time(), 3),
            "request_id": request_id,
            "tenant": tenant,
            "key_id": key_id,
            "model": model,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost": self.cost(prompt_tokens, completion_tokens),
        }
        with self.registry.session() as s:
            s.add(UsageRecord(**entry, **monitoring))
        return entry

    def entries(self, tenant: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's latest requests, newest first."""
        with self.registry.reading() as s:
            rows = s.scalars(
                select(UsageRecord)
                .where(UsageRecord.tenant == tenant)
                .order_by(UsageRecord.ts.desc(), UsageRecord.id.desc())
                .limit(limit)
            )
            return [
                {
                    "ts": r.ts,
                    "request_id": r.request_id,
                    "tenant": r.tenant,
                    "key_id": r.key_id,
                    "model": r.model,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "cost": r.cost,
                }
                for r in rows
            ]

    def summary(self, tenant: str) -> dict[str, Any]:
        query = (
            select(
                UsageRecord.model,
                func.count(),
                func.sum(UsageRecord.prompt_tokens),
                func.sum(UsageRecord.completion_tokens),
                func.sum(UsageRecord.cost),
            )
            .where(UsageRecord.tenant == tenant)
            .group_by(UsageRecord.model)
            .order_by(UsageRecord.model)
        )
        with self.registry.reading() as s:
            rows = s.execute(query).all()
        models = {
            model: {
                "requests": int(n),
                "prompt_tokens": int(prompt or 0),
                "completion_tokens": int(completion or 0),
                "cost": round(float(cost or 0.0), 8),
            }
            for model, n, prompt, completion, cost in rows
        }
        total = {
            "requests": sum(m["requests"] for m in models.values()),
            "prompt_tokens": sum(m["prompt_tokens"] for m in models.values()),
            "completion_tokens": sum(m["completion_tokens"] for m in models.values()),
            "cost": round(sum(m["cost"] for m in models.values()), 8),
        }
        return {
            "object": "usage",
            "tenant": tenant,
            "currency_per_1k_tokens": {"prompt": self.price_prompt_1k, "completion": self.price_completion_1k},
            "total": {**total, "total_tokens": total["prompt_tokens"] + total["completion_tokens"]},
            "by_model": models,
        }
