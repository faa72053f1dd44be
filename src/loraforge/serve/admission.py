"""Scheduled work into the running batch: rows placed, prompts prefilled, first tokens picked.

A request's prompt is prefilled whole (several choices share one prefill) or, for one choice or a
preempted row resuming, in chunks between decode steps (*chunked prefill*), one chunk between two
steps and one token within each step, so that neither one long prompt nor a flood of them stalls
running streams. A cached prompt prefix goes straight into the row's slot. A request that fails
here fails alone, and nothing is sent twice.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from loraforge.serve.batch import RunningBatch
from loraforge.serve.detokenize import TextStream
from loraforge.serve.forward import LlamaRunner
from loraforge.serve.generation import FinishEvent, Generation, PromptEvent
from loraforge.serve.pacing import Pacer, ema
from loraforge.serve.prefix_cache import PrefixCache
from loraforge.serve.rows import Row, Work, gen_of, is_echo
from loraforge.serve.sampling import GREEDY_BELOW, SEED_LIMIT, prompt_event, score_prompt
from loraforge.serve.scheduling import MIN_CHUNK, chunk_budget, chunked

log = logging.getLogger("loraforge.serve")
# Picks the next token of each of ``rows`` from its logits (one row each), as a decode step does.
Advance = Callable[[list[Row], torch.Tensor], None]


class Admission:
    """Places and prefills the work the scheduler picked, in ``batch``.

    Args:
        batch: the running batch (and through it the runner's KV slots).
        tokenizer: for each row's text deltas and stop strings.
        prefix_cache: keeps prompt prefixes' keys and values for requests of the same scope.
        max_prefill_tokens: the most prompt tokens prefilled between two decode steps.
        advance: the engine's next-token step, for the first token after a prefill.
    """

    def __init__(
        self,
        batch: RunningBatch,
        *,
        tokenizer: Any,
        prefix_cache: PrefixCache | None,
        max_prefill_tokens: int,
        advance: Advance,
    ) -> None:
        self.batch = batch
        self.runner: LlamaRunner = batch.runner
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.max_prefill_tokens = max_prefill_tokens
        self.advance = advance
        self.token_s: float | None = None  # a prefilled prompt token's seconds (moving average)

    def score(self, gen: Generation) -> None:
        """Prompt log-probabilities only (``max_tokens`` 0): a prefill in a free slot, no row."""
        req = gen.request
        if gen.cancelled:  # the client left while it waited
            gen.emit(None)
            return
        if req.params.prompt_logprobs:  # without echo nothing of the prompt's logits is answered
            logits = self.runner.prefill(len(self.batch.rows), req.prompt, req.lora, all_logits=True)
            gen.emit(prompt_event(req.prompt, logits, req.params.logprobs or 0))
        for i in range(req.n):
            gen.emit(FinishEvent(i, "length", "", 0))
        gen.emit(None)

    def admit(self, work: list[Work]) -> None:
        """Give each request its rows (and each resumed row a slot), prefill the prompts, and pick
        the first tokens. A request that fails fails alone; nothing is sent twice."""
        work = sorted(work, key=lambda w: gen_of(w).request.adapter or "")  # one adapter's side by side
        whole_echo = [w for w in work if isinstance(w, Generation) and is_echo(w) and not chunked(w)]
        for gen in whole_echo:  # several choices with echo: every position's logits, in one piece
            self.batch.guarded(functools.partial(self._admit_echo, gen), gen)
        plain = [w for w in work if w not in whole_echo]
        if not plain:
            return
        try:
            started = self._admit_together(plain)
        except Exception:
            # Nothing was sent yet: take the rows back and find the one that fails.
            log.exception("prefill of %d requests failed", len(plain))
            for item in plain:
                self.batch.unplace(item)
            if len(plain) == 1:
                self.batch.fail(gen_of(plain[0]))
            else:
                for item in plain:
                    self.admit([item])
            return
        for item, rows, logits in started:  # the first tokens, each request on its own
            self.batch.guarded(functools.partial(self._begin, item, rows, logits), gen_of(item))

    def _admit_echo(self, gen: Generation) -> None:
        rows = [self.batch.rows[self.batch.place(self._new_row(gen, i))] for i in range(gen.request.n)]
        slot = self.batch.rows.index(rows[0])
        logits = self.runner.prefill(slot, gen.request.prompt, gen.request.lora, all_logits=True)
        gen.emit(prompt_event(gen.request.prompt, logits, gen.request.params.logprobs or 0))
        self._start_rows(gen, rows, logits[-1:])

    def _join(self, work: Work) -> None:
        """Place a row whose prompt will be fed in chunks (its cached prefix, if any, goes in now)."""
        if isinstance(work, Row):
            row, tokens, scope = work, work.resume_tokens(), None
            if row.scores is not None:  # echo: scored again from the start, or not at all if answered
                row.scores = PromptEvent(list(row.gen.request.prompt), [None], [None]) if row.prompt_open else None
        else:
            row, tokens, scope = self._new_row(work, 0), work.request.prompt, work.request.cache_scope
            if is_echo(work):  # every position's logits are needed: no cached prefix
                row.scores, scope = PromptEvent(list(tokens), [None], [None]), None
        slot = self.batch.place(row)
        past = 0
        if self.prefix_cache is not None and scope:
            past = self.runner.write_prefix(slot, self.prefix_cache.lookup(scope, tokens))
        row.position, row.last, row.feed, row.fed, row.prompt_open = past, tokens[past], tokens, past + 1, True

    def continue_prefills(self, spent: int, step_s: float | None, pacer: Pacer | None = None) -> Counter[str]:
        """Prefill the next chunk of the open prompts, within what is left of the step's budget
        (``spent`` tokens were prefilled whole; a decode step takes ``step_s``) and of each paced
        tenant's time (``pacer``: its waiting tenants take no chunk); finished prompts pick their
        first token. Returns the prompt tokens prefilled per tenant."""
        taken: Counter[str] = Counter()
        rows = [r for r in self.batch.rows if r.prompt_open]
        if not rows:
            return taken
        # While rows decode, a chunk costs about one step; else up to max_prefill_tokens, so that a
        # request arriving now waits for one chunk at most, not for a flood of prompts.
        decoding = any(not r.prompt_open for r in self.batch.rows)
        limit = self.max_prefill_tokens
        budget = (chunk_budget(step_s, self.token_s, limit) if decoding else limit) - spent
        caps: dict[str, int | None] = {}
        chunks: list[tuple[Row, int]] = []
        for row in rows:  # in slot order: one adapter's rows side by side
            if row.tenant not in caps:
                # a tenant that owes time gets 0: only the token each decode step feeds
                caps[row.tenant] = pacer.tokens_for(row.tenant, self.token_s, MIN_CHUNK) if pacer else None
            cap = caps[row.tenant]
            take = min(1 + row.pending, budget, budget if cap is None else cap)
            if take <= 0:
                if budget <= 0:
                    break
                continue
            chunks.append((row, take))
            budget -= take
            taken[row.tenant] += take
            if cap is not None:
                caps[row.tenant] = cap - take
        if chunks:  # else each open prompt still moves one token per decode step
            # Echo rows need every position's logits, the others only the last: two passes.
            for echo in (False, True):
                group = [c for c in chunks if (c[0].scores is not None) is echo]
                if group:
                    self._prefill_chunks(group)
        return taken

    def _prefill_chunks(self, chunks: list[tuple[Row, int]]) -> None:
        """Prefill ``take`` more prompt tokens of each row together; a row whose chunk fails fails alone."""
        echo = chunks[0][0].scores is not None
        started = time.perf_counter()
        try:
            logits = self.runner.prefill_many(
                [self.batch.rows.index(r) for r, _ in chunks],
                [[r.last, *r.feed[r.fed : r.fed + take - 1]] for r, take in chunks],
                [r.gen.request.lora for r, _ in chunks],
                [r.position for r, _ in chunks],
                all_logits=echo,
            )
        except Exception:
            if len(chunks) == 1:
                log.exception("request %s failed in its prefill", chunks[0][0].gen.request.request_id)
                self.batch.fail(chunks[0][0].gen)
            else:
                for chunk in chunks:  # the same chunks again, one by one: the others go on
                    if chunk[0] in self.batch.rows:
                        self._prefill_chunks([chunk])
            return
        tokens = sum(take for _, take in chunks)
        self.token_s = ema(self.token_s, (time.perf_counter() - started) / tokens)
        done = []
        start = 0
        for i, (row, take) in enumerate(chunks):
            if echo:  # (take, vocab) for this row: score its prompt tokens, keep the last
                mine, start = logits[start : start + take], start + take
                score_prompt(row, mine, row.position)
                last = mine[-1:]
            else:
                last = logits[i : i + 1]
            if take == 1 + row.pending:  # the whole rest of the prompt: the logits pick the first token
                row.position += take - 1
                row.fed = len(row.feed)
                done.append((row, last))
            else:
                row.last = row.feed[row.fed + take - 1]
                row.fed += take
                row.position += take
        for row, _ in done:  # cached before any row starts: a finished row moves the others' KV
            self.close_prompt(row)
        for row, row_logits in done:
            self.batch.guarded(functools.partial(self.advance, [row], row_logits), row.gen)

    def close_prompt(self, row: Row) -> None:
        """The row's prompt is all in its slot: answer its scores (echo), keep its blocks for later
        requests of its scope."""
        row.prompt_open = False
        if row.scores is not None:
            row.gen.emit(row.scores)
        scope = row.gen.request.cache_scope
        if self.prefix_cache is not None and scope:
            slot = self.batch.rows.index(row)
            self.prefix_cache.insert(scope, row.gen.request.prompt, functools.partial(self.runner.read_prefix, slot))

    def _admit_together(self, plain: list[Work]) -> list[tuple[Work, list[Row], torch.Tensor]]:
        """Place and prefill ``plain`` in one forward pass; returns each item's rows and last logits.

        Work prefilled in chunks is only placed (its first token comes from ``continue_prefills``).
        Sends nothing: an error here leaves only rows to take back (``RunningBatch.unplace``).
        """
        for item in [w for w in plain if chunked(w)]:
            self._join(item)
        plain = [w for w in plain if not chunked(w)]
        if not plain:
            return []
        rows: list[list[Row]] = []
        for item in plain:
            if isinstance(item, Row):
                self.batch.place(item)
                rows.append([item])
            else:
                rows.append([self.batch.rows[self.batch.place(self._new_row(item, i))] for i in range(item.request.n)])
        slots = [self.batch.rows.index(r[0]) for r in rows]
        prompts = [w.resume_tokens() if isinstance(w, Row) else w.request.prompt for w in plain]
        cache, past = self.prefix_cache, [0] * len(plain)
        scoped = [
            (i, w.request.cache_scope)
            for i, w in enumerate(plain)
            if isinstance(w, Generation) and w.request.cache_scope
        ]
        if cache is not None:  # a cached prefix goes straight into the slot
            for i, scope in scoped:
                past[i] = self.runner.write_prefix(slots[i], cache.lookup(scope, prompts[i]))
        last = self.runner.prefill_many(
            slots,
            [p[n:] for p, n in zip(prompts, past, strict=True)],
            [gen_of(w).request.lora for w in plain],
            past,
        )
        # Cache the prompts' blocks before any row starts: a row that finishes on its first
        # token is removed, and that moves later rows (their KV) to other slots.
        if cache is not None:
            for i, scope in scoped:
                cache.insert(scope, prompts[i], functools.partial(self.runner.read_prefix, slots[i]))
        return [(item, mine, last[i : i + 1]) for i, (item, mine) in enumerate(zip(plain, rows, strict=True))]

    def _begin(self, item: Work, rows: list[Row], logits: torch.Tensor) -> None:
        if isinstance(item, Row):
            self.advance(rows, logits)  # resumed: the next token, as a decode step would pick it
        else:
            self._start_rows(item, rows, logits)

    def _start_rows(self, gen: Generation, rows: list[Row], logits: torch.Tensor) -> None:
        first = self.batch.rows.index(rows[0])
        for row in rows[1:]:
            self.runner.copy_prefix(first, self.batch.rows.index(row), len(gen.request.prompt))
        self.advance(rows, logits.expand(len(rows), -1))

    def _new_row(self, gen: Generation, index: int) -> Row:
        params = gen.request.params
        generator = None
        if params.temperature >= GREEDY_BELOW:
            generator = torch.Generator()
            seed = (params.seed + index) % SEED_LIMIT if params.seed is not None else torch.seed() % SEED_LIMIT
            generator.manual_seed(seed)
        return Row(
            gen=gen,
            index=index,
            stream=TextStream(self.tokenizer, params.stop),
            position=len(gen.request.prompt) - 1,
            last=-1,
            generator=generator,
        )
