"""Undo the disguises an attack wears before any check reads it.

``normalise`` gives the text every check reads (compatibility forms folded by NFKC, zero-width and
other invisible characters removed, homoglyphs mapped to the Latin letters they imitate, letters
spelled out one by one joined again) and ``views``: that text plus what it may hide, decoded
(base64 blocks, rot13, leetspeak). A view is only added when decoding gives text that reads as
words, so ordinary text costs one view.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass, field

# Invisible characters used to split words so that filters miss them.
_INVISIBLE = dict.fromkeys(
    [
        *(0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0),
        *range(0x200B, 0x2010),
        *range(0x202A, 0x202F),
        *range(0x2060, 0x2070),
        *range(0xFE00, 0xFE10),
        *range(0xE0000, 0xE0080),
    ]
)
# Letters of other scripts that look like Latin ones (Cyrillic, Greek, a few IPA and Armenian).
_CONFUSABLES = str.maketrans(
    {
        **dict(zip("аеорсухіјѕԁɡһӏԛԝասօ", "aeopcyxijsdghlqwwuo", strict=True)),
        **dict(zip("АВЕКМНОРСТХІЈЅԌ", "ABEKMHOPCTXIJSG", strict=True)),
        **dict(zip("αεικνορτυχϲϳ", "aeiknoptuxcj", strict=True)),
        **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX", strict=True)),
        **dict(zip("ɑɩʏ", "aiy", strict=True)),
    }
)
# "i g n o r e", "i.g.n.o.r.e", "i-g-n-o-r-e": three or more single letters, the same separator between.
_SPACED = re.compile(r"(?<![\w.\-])[A-Za-z]([ .\-_*])(?:[A-Za-z]\1)+[A-Za-z](?![\w])")  # one separator throughout
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_LEET_WORD = re.compile(r"\b(?=\w*[A-Za-z])(?=\w*[0-9])[A-Za-z0-9@$!]{3,}\b|\b\w*[@$]\w+\b")
_WORD = re.compile(r"[a-z]+")
# Frequent English words: decoded text that holds several of them is text, not noise.
COMMON = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "to",
        "of",
        "in",
        "on",
        "for",
        "you",
        "your",
        "is",
        "are",
        "be",
        "with",
        "this",
        "that",
        "all",
        "any",
        "it",
        "as",
        "at",
        "by",
        "from",
        "not",
        "no",
        "now",
        "ignore",
        "instructions",
        "previous",
        "rules",
        "system",
        "prompt",
        "tell",
        "me",
        "what",
        "how",
        "do",
        "say",
        "print",
        "reveal",
        "secret",
        "password",
        "above",
        "below",
        "new",
        "following",
        "from",
        "now",
        "on",
        "act",
        "assistant",
        "user",
        "must",
        "only",
        "never",
        "always",
    ]
)


@dataclass
class Normalised:
    """The text checks read (``text``) and what it decodes to (``views``, ``text`` first)."""

    original: str
    text: str
    views: list[str] = field(default_factory=list)
    decoded: list[str] = field(default_factory=list)  # how each extra view was found: base64, rot13, leet
    changed: bool = False  # whether normalising changed anything (invisible characters, homoglyphs, spacing)


_MIXED_WORD = re.compile(r"\w+")
_LOOKALIKES = frozenset(chr(c) for c in _CONFUSABLES)


def _unmix(word: str) -> str:
    """A word that mixes Latin letters with look-alikes of other scripts, in Latin letters only
    (a word all in Cyrillic or Greek is left as it is: it is not a disguise)."""
    if any("a" <= c.lower() <= "z" for c in word) and any(c in _LOOKALIKES for c in word):
        return word.translate(_CONFUSABLES)
    return word


def fold(text: str) -> str:
    """NFKC, invisible characters removed, homoglyphs in mixed-script words mapped to Latin,
    spaced-out letters joined."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    text = _MIXED_WORD.sub(lambda m: _unmix(m.group(0)), text)
    return _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group(0)), text)


def wordiness(text: str) -> int:
    """How many frequent English words ``text`` holds."""
    return sum(1 for w in _WORD.findall(text.lower()) if w in COMMON)


def _base64_views(text: str) -> list[str]:
    views = []
    for match in _BASE64.finditer(text):
        block = match.group(0)
        try:
            raw = base64.b64decode(block + "=" * (-len(block) % 4), validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        printable = sum(c.isprintable() or c.isspace() for c in decoded)
        if decoded and printable / len(decoded) > 0.95 and wordiness(decoded) >= 2:
            views.append(fold(decoded))
    return views


def normalise(text: str) -> Normalised:
    """``text`` folded, and the views it decodes to (see the module's docstring)."""
    folded = fold(text)
    out = Normalised(original=text, text=folded, views=[folded], changed=folded != text)
    for view in _base64_views(folded):
        out.views.append(view)
        out.decoded.append("base64")
    rot = codecs.decode(folded, "rot13")
    if wordiness(rot) >= 3 and wordiness(rot) > 2 * wordiness(folded):
        out.views.append(rot)
        out.decoded.append("rot13")
    if _LEET_WORD.search(folded):
        leet = _LEET_WORD.sub(lambda m: m.group(0).lower().translate(_LEET), folded)
        if leet != folded and wordiness(leet) > wordiness(folded):
            out.views.append(leet)
            out.decoded.append("leet")
    return out
