"""The running batch: rows in KV slots ``0..n-1``, each adapter's rows side by side.

Placing or removing a row keeps every adapter's rows contiguous (a *segment*) by moving a few rows'
keys and values: one copy per later segment. A request that fails frees its slots here, and fails
alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from loraforge.serve.forward import LlamaRunner
from loraforge.serve.generation import ErrorEvent, Generation
from loraforge.serve.lora_batching import Segment
from loraforge.serve.rows import Row, Work, close_choice, segment_end, segment_ends, segment_starts

log = logging.getLogger("loraforge.serve")


class RunningBatch:
    """The rows that decode together, row ``i`` in KV slot ``i`` of ``runner``."""

    def __init__(self, runner: LlamaRunner) -> None:
        self.runner = runner
        self.rows: list[Row] = []

    def segments(self) -> list[Segment]:
        """The rows' adapter segments, in slot order (what a decode step applies)."""
        rows = self.rows
        segments = []
        start = 0
        for end in sorted(segment_ends(rows).values()):
            segments.append(Segment(start, end, rows[start].gen.request.lora))
            start = end
        return segments

    def place(self, row: Row) -> int:
        """Place a row at the end of its adapter's segment; returns its slot."""
        rows = self.rows
        ends = segment_ends(rows)
        if row.key not in ends:
            rows.append(row)
            return len(rows) - 1
        # Open a hole at the end of the row's segment: each later segment moves its first row to
        # just past its end (one KV copy per later segment), last segment first.
        target = ends[row.key]
        rows.append(row)  # placeholder at the end, overwritten below
        hole = len(rows) - 1
        moves = []
        for start in reversed(segment_starts(rows[:-1], after=target)):
            rows[hole] = rows[start]
            moves.append((start, hole))
            hole = start
        rows[hole] = row
        self.runner.move(moves)
        return hole

    def remove(self, position: int) -> None:
        """Take a finished row out, keeping segments contiguous (one KV copy per later segment)."""
        rows = self.rows
        moves = []
        hole = position
        end = segment_end(rows, position)
        while True:
            if end - 1 != hole:
                rows[hole] = rows[end - 1]
                moves.append((end - 1, hole))
            hole = end - 1
            if end == len(rows):
                break
            end = segment_end(rows, end)
        rows.pop()
        self.runner.move(moves)

    def unplace(self, item: Work) -> None:
        """Take back the rows placed for ``item`` (none of them has run)."""
        for i in range(len(self.rows) - 1, -1, -1):
            row = self.rows[i]
            if row is item or (isinstance(item, Generation) and row.gen is item):
                self.remove(i)

    def drop_cancelled(self) -> None:
        for i in range(len(self.rows) - 1, -1, -1):
            row = self.rows[i]
            if row.gen.cancelled:
                self.remove(i)
                close_choice(row.gen)

    def guarded(self, fn: Callable[[], object], gen: Generation) -> None:
        """Run ``fn()``, work of ``gen``'s; an error fails ``gen`` alone."""
        try:
            fn()
        except Exception:
            log.exception("request %s failed in the engine", gen.request.request_id)
            self.fail(gen)

    def fail(self, gen: Generation) -> None:
        """End a request with an error and free every slot it holds. Never raises.

        The message names no detail of the error: it could carry another request's data.
        """
        try:
            for i in range(len(self.rows) - 1, -1, -1):
                if self.rows[i].gen is gen:
                    self.remove(i)
        except Exception:  # the KV could not be moved: drop every row, a correct if costly state
            log.exception("could not free a failed request's rows; failing the batch")
            others = {id(r.gen): r.gen for r in self.rows if r.gen is not gen}.values()
            self.rows.clear()
            self.runner.release()
            for other in others:
                other.emit(ErrorEvent("internal engine error; retry the request", 500))
                other.emit(None)
        gen.emit(ErrorEvent("internal engine error; retry the request", 500))
        gen.emit(None)
