"""Which waiting work joins the batch next: fair shares across tenants, preemption, prefill budgets.

Waiting requests are queued per tenant, and free batch slots go to the tenant that holds the fewest
rows. A tenant below its fair share (``max_batch_size`` / tenants with work) that finds the batch
full takes a slot from the tenant furthest above its share: that tenant's youngest row is
*preempted* (its KV dropped, its state kept, parked here) and resumes first when its tenant's turn
comes. Prompt tokens prefilled between two decode steps are bounded: by ``max_prefill_tokens`` for
whole prompts, and while rows decode by about one step's time for chunks (``chunk_budget``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection

from loraforge.serve.batch import RunningBatch
from loraforge.serve.generation import ErrorEvent, Generation
from loraforge.serve.rows import Row, Work, close_choice, gen_of, is_echo

MIN_CHUNK = 16  # prompt tokens prefilled between two steps at the least (each step feeds one more)


class FairScheduler:
    """The work waiting for a batch slot, per tenant, and the choice of what starts next.

    Args:
        max_batch_size: rows that run at once.
        max_prefill_tokens: prompt tokens prefilled in one piece between two steps (one request
            may exceed it alone).
        max_queue_wait_s: a request not started within this time gets an error (503).
    """

    def __init__(self, *, max_batch_size: int, max_prefill_tokens: int, max_queue_wait_s: float) -> None:
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue_wait_s = max_queue_wait_s
        self.queues: dict[str, deque[Generation]] = {}  # per tenant, in arrival order
        self.parked: dict[str, deque[Row]] = {}  # preempted rows per tenant, resumed first
        self.turn = 0  # rotates which tenant wins a tie
        self.preemptions = 0

    def waiting(self) -> bool:
        return any(self.queues.values()) or any(self.parked.values())

    def queued(self) -> int:
        """Requests waiting in the tenants' queues (preempted rows not counted)."""
        return sum(len(q) for q in self.queues.values())

    def drain(self) -> list[Generation]:
        """Every waiting request and preempted row's request, taken out (the engine is stopping)."""
        waiting = [g for q in self.queues.values() for g in q]
        waiting += [r.gen for p in self.parked.values() for r in p]
        self.queues.clear()
        self.parked.clear()
        return waiting

    def tenants(self) -> list[str]:
        """Tenants with requests or preempted rows waiting."""
        return [t for t in {*self.queues, *self.parked} if self.queues.get(t) or self.parked.get(t)]

    def schedule(self, batch: RunningBatch, waits: Collection[str] = ()) -> list[Work]:
        """Pick the work to start before the next step (called with the engine's lock held).

        Returns new requests and preempted rows, at most ``max_prefill_tokens`` prompt tokens of
        them (or one request), fairly across tenants; preempts rows of ``batch`` where a tenant
        below its fair share finds no free slot. The work of tenants in ``waits`` (paced, see
        ``pacing.py``) stays queued this time.
        """
        now = time.monotonic()
        for queue in self.queues.values():
            for gen in list(queue):
                if gen.cancelled:
                    queue.remove(gen)
                    gen.emit(None)
                elif now - gen.submitted > self.max_queue_wait_s:
                    queue.remove(gen)
                    gen.emit(ErrorEvent(f"no batch slot became free within {self.max_queue_wait_s:g} s; retry later"))
                    gen.emit(None)
        for parked in self.parked.values():
            for row in [r for r in parked if r.gen.cancelled]:
                parked.remove(row)
                close_choice(row.gen)
        waiting = [t for t in self.tenants() if t not in waits]
        if not waiting:
            return []
        running: dict[str, int] = {}
        for row in batch.rows:
            running[row.tenant] = running.get(row.tenant, 0) + 1
        share = max(1, self.max_batch_size // len({*self.tenants(), *running}))
        free = self.max_batch_size - len(batch.rows)
        self.turn += 1
        order = sorted(waiting, key=lambda t: (running.get(t, 0), hash((t, self.turn))))
        for tenant in order:  # preempt for tenants below their share whose next work does not fit
            need = self.slots_needed(tenant)
            while free < need and running.get(tenant, 0) + need <= share:
                victim = max(running, key=lambda t: running[t] if t != tenant else -1, default=None)
                if victim is None or victim == tenant or running[victim] <= share:
                    break
                self.preempt(batch, victim)
                running[victim] -= 1
                free += 1
        admitted: list[Work] = []
        budget = self.max_prefill_tokens
        while order:
            tenant = min(order, key=lambda t: running.get(t, 0))
            resuming, queued = self.parked.get(tenant), self.queues.get(tenant)
            work: Work | None = resuming[0] if resuming else queued[0] if queued else None
            if work is None:
                order.remove(tenant)
                continue
            slots = slots_of(work)
            tokens = whole_prefill(work)
            if (slots > free or (slots == 0 and free == 0)) or (admitted and tokens > budget):
                order.remove(tenant)  # this tenant's next work waits; others may still fit
                continue
            (resuming if isinstance(work, Row) else queued).popleft()  # type: ignore[union-attr]
            admitted.append(work)
            free -= slots
            budget -= tokens
            running[tenant] = running.get(tenant, 0) + max(1, slots)
        return admitted

    def slots_needed(self, tenant: str) -> int:
        parked, queue = self.parked.get(tenant), self.queues.get(tenant)
        if parked:
            return 1
        return max(1, slots_of(queue[0])) if queue else 0

    def preempt(self, batch: RunningBatch, tenant: str) -> None:
        """Take ``tenant``'s youngest running row out of ``batch``; it resumes from ``parked``."""
        rows = batch.rows
        position = max((i for i, r in enumerate(rows) if r.tenant == tenant), key=lambda i: -rows[i].generated)
        row = rows[position]
        batch.remove(position)
        self.parked.setdefault(tenant, deque()).appendleft(row)
        self.preemptions += 1


def chunked(work: Work) -> bool:
    """Whether ``work``'s prompt is prefilled in chunks: a resumed row, or a request of one choice
    that needs the prompt's keys (to generate) or logits (echo). The choices of one prompt
    share one prefill, in one piece."""
    if isinstance(work, Row):
        return True
    return work.request.n == 1 and (work.request.params.max_tokens > 0 or is_echo(work))


def slots_of(work: Work) -> int:
    """Batch slots that ``work`` keeps: a row one, a request its choices, a scoring request none."""
    if isinstance(work, Row):
        return 1
    if work.request.params.max_tokens:
        return work.request.n
    return 1 if chunked(work) else 0  # a chunked echo holds a slot while it is scored


def whole_prefill(work: Work) -> int:
    """Prompt tokens ``work`` prefills in one piece when it is admitted (0 if chunked, or if
    nothing of its prompt is computed: scoring without echo)."""
    if chunked(work):
        return 0
    params = gen_of(work).request.params
    return len(gen_of(work).request.prompt) if params.max_tokens > 0 or params.prompt_logprobs else 0


def chunk_budget(step_s: float | None, token_s: float | None, max_prefill_tokens: int) -> int:
    """Prompt tokens to prefill between two steps while rows decode: as many as take about one
    decode step's time (``step_s`` and a prompt token's ``token_s``, both measured as the engine
    runs), so a running stream's tokens come at most about twice as slowly; at least
    ``MIN_CHUNK``, at most ``max_prefill_tokens``."""
    if step_s is None or token_s is None:
        return max_prefill_tokens
    return max(MIN_CHUNK, min(max_prefill_tokens, int(step_s / token_s)))
