"""Incremental detokenization with stop strings: what a client may be sent after each token."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns generated token ids into text deltas, cutting at the first stop string.

    Text that could still become a stop string (a suffix equal to a stop string's prefix) and
    incomplete UTF-8 (a trailing U+FFFD) are held back until the next token settles them, so a
    client never receives text that is later taken back.

    Each token costs the same whatever the length so far: only the tokens since the last text
    that came out are decoded, with the tokens of that text before them as context (a tokenizer
    may write a token differently at the start of a text, e.g. SentencePiece's leading space), and
    the new text is the part past that context's own text. Stop strings are searched for in the
    new text and the few characters before it.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:settled] made the last text that came out: context
        self.settled = 0  # ids[settled:] have not made text yet
        self.text = ""
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token. Returns (text to send now, whether a stop string was reached)."""
        self.ids.append(token_id)
        context = self._decode(self.ids[self.prefix : self.settled])
        window = self._decode(self.ids[self.prefix :])
        if window.endswith("\ufffd") or len(window) <= len(context):
            return "", False  # half a character, or a token that writes nothing (yet)
        searched = max(0, len(self.text) - self.longest_stop + 1)
        self.text += window[len(context) :]
        self.prefix, self.settled = self.settled, len(self.ids)
        cut = min((i for i in (self.text.find(s, searched) for s in self.stop) if i != -1), default=-1)
        if cut != -1:
            self.text = self.text[:cut]
            return self._take(cut), True
        hold = max((_overlap(self.text, s) for s in self.stop), default=0)
        return self._take(len(self.text) - hold), False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""

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
