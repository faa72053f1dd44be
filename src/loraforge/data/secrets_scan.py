"""Secrets in text: API keys, tokens, passwords in URLs and private keys.

Known formats (as detect-secrets' plugins know them) are matched exactly; a generic assignment
(``api_key = …``, ``"password": "…"``) counts only when its value looks random: long enough and
with a Shannon entropy above the threshold (hex and base64 alphabets measured separately, as
detect-secrets does), so that ``password: <your password>`` in documentation is not flagged.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from loraforge.data.pii import Finding

_KNOWN = [
    ("AWS_ACCESS_KEY", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
    ("GITHUB_TOKEN", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    ("GITLAB_TOKEN", r"\bglpat-[A-Za-z0-9_-]{20,}\b"),
    ("SLACK_TOKEN", r"\bxox[abposr]-[A-Za-z0-9]+(?:-[A-Za-z0-9]+)+"),
    ("STRIPE_KEY", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    ("GOOGLE_API_KEY", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("OPENAI_KEY", r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}\b"),
    ("JWT", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    ("PRIVATE_KEY", r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY(?: BLOCK)?-----"),
    ("URL_PASSWORD", r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:[^\s:/@]{3,}@[^\s/]+"),
]
_KNOWN_RX = [(kind, re.compile(p)) for kind, p in _KNOWN]
_ASSIGNMENT = re.compile(
    r"""(?i)\b(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|passw(?:or)?d|pwd)"""
    r"""["']?\s*[:=]\s*["']?([^\s"',;]{8,})"""
)
HEX = set("0123456789abcdefABCDEF")


def shannon_entropy(s: str) -> float:
    """Bits per character of ``s``."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def looks_random(value: str) -> bool:
    """detect-secrets-style limits: hex above 3.0 bits/char, base64-like above 3.5 (and mixed classes)."""
    if set(value) <= HEX:
        return len(value) >= 16 and shannon_entropy(value) > 3.0
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return shannon_entropy(value) > 3.5 and classes >= 2 and len(value) >= 10


def find_secrets(text: str) -> list[Finding]:
    """Secrets in ``text``, typed ``SECRET_<KIND>``, e.g. ``SECRET_AWS_ACCESS_KEY``."""
    found: list[Finding] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, spans: Iterable[tuple[int, int]]) -> None:
        for s, e in spans:
            if not any(s < te and ts < e for ts, te in taken):
                taken.append((s, e))
                found.append(Finding(f"SECRET_{kind}", s, e, text[s:e]))

    for kind, rx in _KNOWN_RX:
        add(kind, (m.span() for m in rx.finditer(text)))
    add("HIGH_ENTROPY", (m.span(1) for m in _ASSIGNMENT.finditer(text) if looks_random(m.group(1))))
    return sorted(found, key=lambda f: f.start)
