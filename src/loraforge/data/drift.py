"""Input drift: how unlike an adapter's training prompts the prompts it is sent now are.

Training writes ``input_profile.json`` beside the adapter: the hashed character 4-grams of its
training prompts' words (the user turns; no text is stored, only 20-bit hashes) and a calibration
measured on those same prompts by cross-validation. A prompt's *novelty* is the share of its
n-grams the profile has never seen (0: every piece of every word familiar, 1: none). Calibration
scores each training prompt against a profile built without its own fold, so the scores are those
of prompts the profile did not contain, like new in-domain traffic; the 95th percentile of those
scores is the line above which a prompt counts as *unfamiliar*, so about 5% of in-domain prompts
are unfamiliar by construction.

Over a window of recent prompts the share of unfamiliar ones is compared with that 5%: the alert
threshold is 5% plus three binomial standard deviations for the window's size (a false alarm on
in-domain traffic is a three-sigma event per full window), and a share above it raises the alert.
Counting unfamiliar prompts, rather than averaging scores, keeps a shift of part of the traffic
visible; how large a shift a window of a given size catches is in docs/monitoring.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError
from loraforge.files import write_text_atomic

PROFILE_FILE = "input_profile.json"
PROFILE_VERSION = 1
BUCKETS = 1 << 20  # hashed n-gram space: collisions stay rare for a few hundred thousand distinct n-grams
FOLDS = 5
EXPECTED = 0.05  # the share of in-domain prompts above the calibrated line, by construction
DEFAULT_WINDOW = 50
MIN_PROMPTS = 20  # a smaller calibration set gives no usable percentile
GRAM = 4
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def ngrams(text: str) -> list[str]:
    """The character 4-grams of ``text``'s words (lower-cased letters and digits, one space between).

    Character 4-grams separated in-domain from other-domain prompts best of word unigrams,
    bigrams and character 3- to 5-grams (docs/monitoring.md has the figures): they see a new
    word's familiar stem, and a prompt's topic in its word pieces, where whole words are too sparse.
    """
    joined = " ".join(WORD.findall(text.lower()))
    return [joined[i : i + GRAM] for i in range(len(joined) - GRAM + 1)]


def _bucket(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little") % BUCKETS


def buckets(text: str) -> list[int]:
    return [_bucket(g) for g in ngrams(text)]


def novelty(seen: set[int] | frozenset[int], grams: Sequence[int]) -> float:
    """The share of ``grams`` not in ``seen`` (0.0 for a prompt without words)."""
    if not grams:
        return 0.0
    return sum(1 for g in grams if g not in seen) / len(grams)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    at = q * (len(ordered) - 1)
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def alert_share(window: int, expected: float = EXPECTED) -> float:
    """The share of unfamiliar prompts in a full window of ``window`` that raises the alert."""
    return expected + 3 * math.sqrt(expected * (1 - expected) / window)


@dataclass(frozen=True)
class InputProfile:
    """The n-grams of an adapter's training prompts and the line between familiar and unfamiliar."""

    seen: frozenset[int]
    line: float  # a prompt with a higher novelty is unfamiliar
    prompts: int
    calibration: dict[str, float]

    def novelty(self, text: str) -> float:
        return novelty(self.seen, buckets(text))

    def unfamiliar(self, text: str) -> bool:
        return self.novelty(text) > self.line

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": PROFILE_VERSION,
            "method": "hashed character 4-grams of words; novelty = share of a prompt's 4-grams never seen",
            "buckets": BUCKETS,
            "prompts": self.prompts,
            "line": self.line,
            "expected_unfamiliar": EXPECTED,
            "calibration": self.calibration,
            "seen": sorted(self.seen),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputProfile:
        if data.get("format_version") != PROFILE_VERSION or data.get("buckets") != BUCKETS:
            raise ConfigError(
                f"input profile format {data.get('format_version')!r} with {data.get('buckets')!r} buckets is not "
                f"this version's ({PROFILE_VERSION}, {BUCKETS}); "
                "build it again with `loraforge adapters profile ADAPTER_DIR --data FILE`"
            )
        return cls(
            frozenset(int(b) for b in data["seen"]), float(data["line"]), int(data["prompts"]), data["calibration"]
        )

    def write(self, directory: Path) -> Path:
        path = directory / PROFILE_FILE
        write_text_atomic(path, json.dumps(self.to_json(), separators=(",", ":")))
        return path


def build_profile(prompts: Iterable[str]) -> InputProfile:
    """The profile of ``prompts`` (an adapter's training prompts), calibrated by ``FOLDS``-fold
    cross-validation (each prompt's fold is fixed by a hash of its text: the same data, the same line).

    Raises:
        ConfigError: fewer than ``MIN_PROMPTS`` prompts with words.
    """
    grams = [buckets(p) for p in prompts]
    grams = [g for g in grams if g]
    if len(grams) < MIN_PROMPTS:
        raise ConfigError(
            f"an input profile needs at least {MIN_PROMPTS} training prompts with words, got {len(grams)}"
        )
    folds = [hash_fold(g) for g in grams]
    scores = []
    for k in range(FOLDS):
        seen = {b for g, f in zip(grams, folds, strict=True) if f != k for b in g}
        scores += [novelty(seen, g) for g, f in zip(grams, folds, strict=True) if f == k]
    line = _percentile(scores, 1 - EXPECTED)
    calibration = {
        "mean_novelty": round(sum(scores) / len(scores), 4),
        "p50_novelty": round(_percentile(scores, 0.5), 4),
        "p95_novelty": round(line, 4),
        "folds": FOLDS,
    }
    return InputProfile(frozenset(b for g in grams for b in g), line, len(grams), calibration)


def hash_fold(grams: Sequence[int]) -> int:
    return hashlib.blake2b(repr(list(grams)).encode(), digest_size=4).digest()[0] % FOLDS


def read_profile(directory: Path) -> InputProfile | None:
    """The profile beside an adapter, or None when its training wrote none (an older version)."""
    path = directory / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        return InputProfile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable input profile ({e})") from e


@dataclass
class DriftWindow:
    """The latest ``size`` prompts of one adapter: how many were unfamiliar, and whether that alerts."""

    profile: InputProfile
    size: int = DEFAULT_WINDOW
    flags: deque[bool] = field(default_factory=deque)

    def add(self, text: str) -> float:
        """Score one prompt; returns its novelty."""
        score = self.profile.novelty(text)
        self.flags.append(score > self.profile.line)
        while len(self.flags) > self.size:
            self.flags.popleft()
        return score

    @property
    def share(self) -> float:
        return sum(self.flags) / len(self.flags) if self.flags else 0.0

    @property
    def threshold(self) -> float:
        return alert_share(self.size)

    @property
    def alert(self) -> bool:
        """Only a full window can alert: a handful of prompts says nothing."""
        return len(self.flags) >= self.size and self.share > self.threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": len(self.flags),
            "window": self.size,
            "unfamiliar_share": round(self.share, 4),
            "threshold": round(self.threshold, 4),
            "alert": self.alert,
        }


def prompt_texts(messages: Iterable[tuple[str, str]]) -> str:
    """What a conversation asks: its user turns, joined (``(role, content)`` pairs)."""
    return "\n".join(content for role, content in messages if role == "user")
