"""Metering: every request's tokens and cost, per tenant, kept in ``HOME/usage.jsonl``."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from loraforge.files import open_private, private_directory


class UsageLedger:
    """Appends one line per finished request and keeps running totals (rebuilt from the file at start)."""

    def __init__(self, home: Path, *, price_prompt_1k: float, price_completion_1k: float) -> None:
        self.path = home / "usage.jsonl"
        self.price_prompt_1k = price_prompt_1k
        self.price_completion_1k = price_completion_1k
        self._lock = threading.Lock()
        self._totals: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(_zero))
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self._add(json.loads(line))
                except (ValueError, KeyError):
                    continue  # a line cut short by a crash: skip it, keep the rest

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return round(
            prompt_tokens / 1000 * self.price_prompt_1k + completion_tokens / 1000 * self.price_completion_1k, 8
        )

    def record(
        self, *, request_id: str, tenant: str, key_id: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
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
        with self._lock:
            private_directory(self.path.parent)
            with open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, text=True) as f:
                f.write(json.dumps(entry) + "\n")
            self._add(entry)
        return entry

    def _add(self, entry: dict[str, Any]) -> None:
        for model in (entry["model"], "*"):
            t = self._totals[entry["tenant"]][model]
            t["requests"] += 1
            t["prompt_tokens"] += entry["prompt_tokens"]
            t["completion_tokens"] += entry["completion_tokens"]
            t["cost"] = round(t["cost"] + entry["cost"], 8)

    def summary(self, tenant: str) -> dict[str, Any]:
        with self._lock:
            models = {m: dict(v) for m, v in self._totals.get(tenant, {}).items()}
        total = models.pop("*", _zero())
        return {
            "object": "usage",
            "tenant": tenant,
            "currency_per_1k_tokens": {"prompt": self.price_prompt_1k, "completion": self.price_completion_1k},
            "total": {**total, "total_tokens": total["prompt_tokens"] + total["completion_tokens"]},
            "by_model": models,
        }


def _zero() -> dict[str, float]:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
