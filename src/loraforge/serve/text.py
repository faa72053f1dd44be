"""Incremental detokenization with stop strings: what a client may be sent after each token."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns generated token ids into text deltas, cutting at the first stop string.

    Text that could still become a stop string (a suffix equal to a stop string's prefix) and
    incomplete UTF-8 (a trailing U+FFFD) are held back until the next token settles them, so a
    client never receives text that is later taken back.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token. Returns (text to send now, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stop) if i != -1), default=-1)
        if cut != -1:
            self.text = text[:cut]
            return self._take(cut), True
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        return self._take(len(text) - hold), False

    def flush(self) -> str:
        """Everything not sent yet (the generation ended for another reason than a stop string)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
