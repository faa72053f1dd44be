"""The prompt-injection and jailbreak detector: normalisation, rules, embeddings, a classifier.

A text is normalised (``normalize.py``) into the views it may hide; the rules (``rules.py``) read
every view; each view is cut into windows of about ``WINDOW_CHARS`` characters (the embedder reads
256 tokens at most) and into sentences and lines (an instruction hidden in a document is one of
them, and would be diluted in its window); each piece is embedded once (``embed.py``) and scored by
the classifier (``classifier.py``) together with the text's rule features. The text's score is its
highest piece's. The shipped weights
(``weights/injection.json``) are reproduced by ``loraforge guard train``.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraforge.guard.classifier import LogisticModel
from loraforge.guard.embed import Embedder, shared_embedder
from loraforge.guard.normalize import normalise
from loraforge.guard.rules import RULE_NAMES, Hit, match, rule_score

WEIGHTS = Path(__file__).parent / "weights" / "injection.json"
WINDOW_CHARS = 900  # about 200 tokens of English: within the embedder's 256
OVERLAP_CHARS = 150
MAX_WINDOWS = 16  # a longer text is scored on its first windows and its last one
EXTRA_FEATURES = ("rules", "decoded", "changed")
CACHE_SIZE = 4096  # embeddings of recent pieces kept (384 floats each: 6 MB)


@dataclass
class Verdict:
    """What the detector found in one text."""

    score: float  # 0..1: the highest window's probability of an injection or jailbreak
    flagged: bool  # score ≥ the threshold
    threshold: float
    rules: list[Hit] = field(default_factory=list)
    decoded: list[str] = field(default_factory=list)  # base64, rot13, leet: what the text hid
    windows: int = 1  # pieces scored (windows and sentences)

    def as_dict(self) -> dict[str, object]:
        return {
            "injection_score": round(self.score, 4),
            "flagged": self.flagged,
            "threshold": self.threshold,
            "rules": [h.rule for h in self.rules],
            "decoded": self.decoded,
        }


def windows(text: str) -> list[str]:
    """``text`` in overlapping windows of about ``WINDOW_CHARS`` characters, cut at spaces."""
    if len(text) <= WINDOW_CHARS:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + WINDOW_CHARS)
        if end < len(text):
            space = text.rfind(" ", start + WINDOW_CHARS // 2, end)
            end = space if space > 0 else end
        out.append(text[start:end])
        if end >= len(text):
            break
        start = max(end - OVERLAP_CHARS, start + 1)
    if len(out) > MAX_WINDOWS:
        out = [*out[: MAX_WINDOWS - 1], out[-1]]
    return out


_SEGMENT = re.compile(r"(?<=[.!?])\s+(?=\S)|\s*\n\s*|<!--|-->|\"\s*[,:}\]]\s*\"?")
MIN_SEGMENT = 40  # shorter pieces join the next one
MAX_SEGMENTS = 48  # of one text (the first ones; windows still cover the rest)


def segments(text: str) -> list[str]:
    """``text`` cut into sentences and lines (an instruction hidden in a document is one of them);
    [] when it is a single piece."""
    pieces = [p.strip() for p in _SEGMENT.split(text) if p and p.strip()]
    out: list[str] = []
    for piece in pieces:
        if out and len(out[-1]) < MIN_SEGMENT:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    if len(out) > 1 and len(out[-1]) < MIN_SEGMENT:
        out[-2:] = [f"{out[-2]} {out[-1]}"]
    return out[:MAX_SEGMENTS] if len(out) > 1 else []


def rule_features(hits: list[Hit], decoded: bool, changed: bool) -> list[float]:
    """The non-embedding features: each rule family's weight (0 if it did not match), then
    the combined rule score, whether something was decoded, whether normalising changed the text."""
    by_name = {h.rule: h.weight for h in hits}
    return [by_name.get(name, 0.0) for name in RULE_NAMES] + [rule_score(hits), float(decoded), float(changed)]


def feature_names(dim: int) -> list[str]:
    return [f"embedding_{i}" for i in range(dim)] + [f"rule_{n}" for n in RULE_NAMES] + list(EXTRA_FEATURES)


class InjectionDetector:
    """Scores texts; ``check`` one, ``check_many`` several with one embedding pass.

    Embeddings of the pieces scored lately are kept (``cache_size`` of them, least recently used
    out), per ``scope``: a conversation sends its earlier messages again with every turn, and only
    the new one needs a forward pass. The server's scope is the tenant, so that one tenant's
    latency says nothing about what another sent.

    Args:
        model: the classifier (default: the shipped weights).
        embedder: the sentence embedder (default: the process's shared one).
        threshold: overrides the model's own threshold (a policy's setting).
        cache_size: embeddings kept (0: none).
    """

    def __init__(
        self,
        model: LogisticModel | None = None,
        embedder: Embedder | None = None,
        threshold: float | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.model = model or LogisticModel.load(WEIGHTS)
        self.embedder = embedder or shared_embedder()
        self.threshold = self.model.threshold if threshold is None else threshold
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.embedded = 0  # pieces that needed a forward pass (the others came from the cache)

    def _embed(self, pieces: list[str], scope: str) -> np.ndarray:
        """Embeddings of ``pieces``: from the cache where it has them, one forward pass for the rest."""
        out = np.zeros((len(pieces), self.embedder.dim), dtype=np.float32)
        with self._lock:
            missing = []
            for i, piece in enumerate(pieces):
                hit = self._cache.get((scope, piece)) if self.cache_size else None
                if hit is None:
                    missing.append(i)
                else:
                    self._cache.move_to_end((scope, piece))
                    out[i] = hit
        if missing:
            fresh = self.embedder.encode([pieces[i] for i in missing])
            self.embedded += len(missing)
            with self._lock:
                for i, row in zip(missing, fresh, strict=True):
                    out[i] = row
                    if self.cache_size:
                        self._cache[(scope, pieces[i])] = row.copy()
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def features(
        self, texts: list[str], scope: str = ""
    ) -> tuple[np.ndarray, list[int], list[tuple[list[Hit], list[str]]]]:
        """One feature row per piece (window or sentence) of each text's views; returns (rows, the
        text of each row, per text its rule hits and what it decoded). ``scope``: whose cache."""
        pieces: list[str] = []
        owners: list[int] = []
        extras: list[list[float]] = []
        found: list[tuple[list[Hit], list[str]]] = []
        for i, text in enumerate(texts):
            norm = normalise(text)
            hits = match(norm.views)
            found.append((hits, norm.decoded))
            extra = rule_features(hits, bool(norm.decoded), norm.changed)
            for view in norm.views:
                for piece in [*windows(view), *segments(view)]:
                    pieces.append(piece)
                    owners.append(i)
                    extras.append(extra)
        embeddings = self._embed(pieces, scope)
        rows = np.concatenate([embeddings, np.asarray(extras, dtype=np.float32).reshape(len(pieces), -1)], axis=1)
        return rows, owners, found

    def check_many(self, texts: list[str], scope: str = "") -> list[Verdict]:
        rows, owners, found = self.features(texts, scope)
        scores = self.model.probability(rows) if len(rows) else np.zeros(0, np.float32)
        best = np.zeros(len(texts), dtype=np.float32)
        counts = np.zeros(len(texts), dtype=np.int64)
        np.maximum.at(best, np.asarray(owners, dtype=np.int64), scores.astype(np.float32))
        np.add.at(counts, np.asarray(owners, dtype=np.int64), 1)
        return [
            Verdict(
                score=float(best[i]),
                flagged=bool(best[i] >= self.threshold),
                threshold=self.threshold,
                rules=found[i][0],
                decoded=found[i][1],
                windows=int(counts[i]),
            )
            for i in range(len(texts))
        ]

    def check(self, text: str) -> Verdict:
        return self.check_many([text])[0]


@functools.lru_cache(maxsize=1)
def shared_detector() -> InjectionDetector:
    """The process's detector with the shipped weights (loaded on first use)."""
    return InjectionDetector()
