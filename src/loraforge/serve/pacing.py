"""How long one tenant's work between two decode steps may hold up the other tenants' streams.

Between two decode steps the engine prefills prompts (whole, or the next chunk of a long one) and
scores them. Every running stream waits for that work, and so does every request waiting for its
first token, whoever the work is for. Fair slots alone do not bound the wait: a tenant that floods
with long prompts and echo requests fills every gap between steps with its own prefill, and another
tenant's stream, which needs one short step per token, comes several times more slowly than alone.

So a tenant that has used more of the engine lately than another tenant that is waiting (rows in
the batch, a request queued, or a request finished within ``LINGER_S``: clients send the next one
at once) is *paced*, by a token bucket in seconds: its work between steps runs while it owes no
time, what it took is owed, and each step pays back an ``allowance``. The allowance keeps the
lighter tenants' streams within ``PACE`` times their own pace: ``PACE`` × the time a step of their
rows alone takes (measured, per batch size), less the time of the step they now share; never less
than ``MIN_SHARE`` of a step, so that the paced tenant's work always moves on. The lightest tenant
is never paced, and a tenant alone is not paced: it may trade its own streams' speed for its
prompts' as it likes. "Used lately" is engine time (its rows' share of each step, and its work
between steps), decaying with a time constant of ``USAGE_TAU_S``.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable

PACE = 1.5  # lighter tenants' streams take at most this many times their own step time, where the machine allows
MIN_SHARE = 0.2  # a paced tenant's work gets at least this share of a step, on average
LINGER_S = 0.5  # a tenant whose work ended this recently still counts as waiting
USAGE_TAU_S = 2.0  # how fast past use of the engine is forgotten
MAX_DEBT_S = 1.0  # a paced tenant owes at most this much (so that it waits a bounded time)


class Pacer:
    """Per tenant, engine time used lately and time owed for work between steps.

    The engine calls ``record_step`` after each decode step, ``plan`` before the work between two
    steps (it says whose work waits, and how much time each paced tenant may take now), and
    ``charge`` after it.
    """

    def __init__(
        self, *, pace: float = PACE, min_share: float = MIN_SHARE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.pace = pace
        self.min_share = min_share
        self.clock = clock
        self.debt: dict[str, float] = {}  # seconds each paced tenant still owes
        self.usage: dict[str, float] = {}  # engine seconds per tenant, decaying
        self.seen: dict[str, float] = {}  # when each tenant last had work in the engine
        self.step_by_size: dict[int, float] = {}  # a decode step's seconds per batch size (moving average)
        self.step_s: float | None = None  # a decode step's seconds (moving average over all sizes)
        self.paced: dict[str, float] = {}  # this round: tenant → seconds it may take now
        self.waits: set[str] = set()  # this round: tenants whose work waits
        self.light_rows = 0  # this round: rows of the tenants that are not paced
        self._decayed = clock()

    def record_step(self, rows: Counter[str], seconds: float) -> None:
        """A decode step of ``rows`` (rows per tenant) took ``seconds``: each tenant used its rows'
        share, and the paced tenants owe what their rows added to the lighter tenants' step."""
        size = rows.total()
        self.step_by_size[size] = ema(self.step_by_size.get(size), seconds)
        self.step_s = ema(self.step_s, seconds)
        for tenant, count in rows.items():
            self.usage[tenant] = self.usage.get(tenant, 0.0) + seconds * count / size
        heavy = {t: n for t, n in rows.items() if t in self.debt}
        if heavy and self.light_rows:
            added = max(0.0, seconds - (self.alone(self.light_rows) or seconds))
            heavy_rows = sum(heavy.values())
            for tenant, count in heavy.items():
                self.owe(tenant, added * count / heavy_rows)

    def owe(self, tenant: str, seconds: float) -> None:
        self.debt[tenant] = min(MAX_DEBT_S, self.debt.get(tenant, 0.0) + seconds)

    def alone(self, size: int) -> float | None:
        """A step of ``size`` rows' seconds: measured at that size, or the nearest size below
        (a lower bound), or above; ``None`` before any step."""
        if not self.step_by_size:
            return None
        below = [s for s in self.step_by_size if s <= size]
        return self.step_by_size[max(below) if below else min(self.step_by_size)]

    def allowance(self, others_rows: int) -> float:
        """Seconds per step a paced tenant may add to the steps of a lighter tenant with
        ``others_rows`` rows (its rows' part of each step, its work between steps) that keeps that
        tenant's streams within ``pace`` of their own pace; at least ``min_share`` of a step."""
        step = self.step_s or 0.0
        alone = self.alone(others_rows)
        room = (self.pace - 1) * alone if alone is not None else 0.0
        return max(self.min_share * step, room)

    def plan(self, rows: Counter[str], queued: Iterable[str] = ()) -> set[str]:
        """Before the work between two steps: pay each step's allowance off the paced tenants'
        debts; returns those whose work waits this time (they still owe). ``rows``: rows in the
        batch per tenant; ``queued``: tenants with requests waiting for a slot.

        Afterwards ``paced`` holds, for each paced tenant that may work now, the seconds it may take.
        """
        now = self.clock()
        fade = math.exp(-(now - self._decayed) / USAGE_TAU_S)
        self._decayed = now
        self.usage = {t: u * fade for t, u in self.usage.items() if u * fade > 1e-6 or t in rows}
        for tenant in (*rows, *queued):
            self.seen[tenant] = now
        self.seen = {t: at for t, at in self.seen.items() if now - at <= LINGER_S}
        waiting = {t: max(1, rows.get(t, 0)) for t in self.seen}
        self.paced, self.waits, self.light_rows = {}, set(), 0
        for tenant in waiting:
            used = self.usage.get(tenant, 0.0)
            lighter = [n for t, n in waiting.items() if t != tenant and self.usage.get(t, 0.0) < used]
            if not lighter:  # nobody lighter waits for this tenant's work
                self.debt.pop(tenant, None)
                self.light_rows += rows.get(tenant, 0)
                continue
            allowance = self.allowance(min(lighter))
            debt = max(0.0, self.debt.get(tenant, 0.0) - allowance)
            self.debt[tenant] = debt
            if debt > 1e-9:  # (a nanosecond's rounding is not a debt)
                self.waits.add(tenant)
            else:
                self.paced[tenant] = allowance
        self.debt = {t: d for t, d in self.debt.items() if t in self.paced or t in self.waits}
        return self.waits

    def charge(self, seconds: float, tokens: Counter[str]) -> None:
        """``seconds`` of work between steps were spent on ``tokens`` prompt tokens per tenant:
        each tenant used its share, and the paced tenants owe it."""
        total = tokens.total()
        if seconds <= 0 or total <= 0:
            return
        for tenant, count in tokens.items():
            share = seconds * count / total
            self.usage[tenant] = self.usage.get(tenant, 0.0) + share
            if tenant in self.debt:
                self.owe(tenant, share)

    def tokens_for(self, tenant: str, token_s: float | None, minimum: int) -> int | None:
        """The prompt tokens ``tenant`` may prefill in chunks now (``None``: no pacing limit)."""
        if tenant in self.waits:
            return 0
        allowed = self.paced.get(tenant)
        if allowed is None:
            return None
        if token_s is None or token_s <= 0:
            return minimum
        return max(minimum, round(allowed / token_s))


def ema(average: float | None, value: float, weight: float = 0.2) -> float:
    """An exponential moving average of measured times; ``None`` before the first measurement."""
    return value if average is None else (1 - weight) * average + weight * value
