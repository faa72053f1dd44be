"""Personal data in text: detection, typed redaction, and per-example actions. Works offline.

Structured identifiers are found by pattern and then *validated* with a well-kept library, so a
random digit string is not reported as a card or an ID:

=============  ============================================================  =====================
type           pattern                                                       validated by
=============  ============================================================  =====================
EMAIL          local@domain.tld                                              structure
PHONE          international and national formats (US, GB, DE, FR, ES, IN)   ``phonenumbers``
CREDIT_CARD    13–19 digits, spaces/dashes allowed                           Luhn (``stdnum``)
IBAN           country code, check digits, BBAN                              mod-97 (``stdnum``)
IP_ADDRESS     IPv4 and IPv6                                                 ``ipaddress``
US_SSN         123-45-6789                                                   ``stdnum.us.ssn``
UK_NINO        AB123456C                                                     HMRC prefix rules
UK_NHS         943 476 5919                                                  mod-11 (``stdnum``)
DE_TAX_ID      11-digit Steuer-IdNr                                          ``stdnum.de.idnr``
FR_NIR         15-digit numéro de sécurité sociale                           ``stdnum.fr.nir``
ES_DNI         12345678Z, X1234567L (NIE)                                    ``stdnum.es.dni/nie``
IN_AADHAAR     1234 5678 9012                                                Verhoeff (``stdnum``)
IN_PAN         ABCDE1234F                                                    ``stdnum.in_.pan``
POSTAL_ADDRESS number + street name + street type (EN/DE/FR/ES/IT), postcodes  context
PERSON         a known first name (``gender-guesser``'s international list)  capitalisation,
               followed by a capitalised surname, or a title + name          titles
=============  ============================================================  =====================

A validity check raises confidence; it does not decide alone. A value of the exact shape that
fails its check is still personal data when a label names it just before it ("my SSN is
078-05-1120", "NINO: QQ 12 34 56 C"): blocklisted, reserved or mistyped numbers are real
numbers to whoever wrote them. Without a label, a value must pass its check (a random digit
string is not a card). So, for every type with a check:

=============  ===================  =============================================================
check passes   label before it      found
=============  ===================  =============================================================
yes            either               yes, ``Finding.valid`` is True
no             yes                  yes, ``Finding.valid`` is False
no             no                   no
=============  ===================  =============================================================

The label is one of the type's words (:data:`LABELS`) in the 40 characters before the value.
Never found, even with a label: a value right after a reference word (``order``, ``ticket``…)
and a placeholder made of one repeated character (``000-00-0000``).

Names and addresses are heuristics without a language model (:mod:`loraforge.data.pii_heuristics`):
precision and recall for every type are measured on the labelled synthetic gold set in
``tests/data/test_pii.py``.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from loraforge.data.pii_heuristics import find_addresses, find_persons

PiiAction = Literal["report", "redact", "drop"]
STRUCTURED = (
    "EMAIL",
    "PHONE",
    "CREDIT_CARD",
    "IBAN",
    "IP_ADDRESS",
    "US_SSN",
    "UK_NINO",
    "UK_NHS",
    "DE_TAX_ID",
    "FR_NIR",
    "ES_DNI",
    "IN_AADHAAR",
    "IN_PAN",
)
PII_TYPES = (*STRUCTURED, "POSTAL_ADDRESS", "PERSON")


@dataclass(frozen=True)
class Finding:
    type: str
    start: int
    end: int
    text: str
    # True: passed its type's validity check; False: failed it (then a label names it); None: no check
    valid: bool | None = None
    labelled: bool = False  # a word naming the type stands just before it (see LABELS)

    def masked(self) -> str:
        """The value with most characters hidden, for reports that must not repeat the data."""
        t = self.text
        if self.type.startswith("SECRET"):
            return f"[{len(t)} characters]"  # no part of a secret is shown
        keep = 2 if len(t) > 6 else 1
        return t[:keep] + "•" * max(1, len(t) - 2 * keep) + t[-keep:]


# A number right after one of these words is an order, ticket or product number, not personal data.
# (Whole words: "SSN:" is a label, not "S/N:", and "department 12" is not "part 12".)
_REFERENCE_BEFORE = re.compile(
    r"(?i)(?:(?<!\w)(?:order|invoice|ticket|ref(?:erence)?|tracking|sku|upc|ean|imei|serial|s/?n|model|part|item|"
    r"case|version|v|release|firmware|build)|#)\s*(?:no\.?|nr\.?|number|num\.?|id)?\s*[:#]?\s*$"
)


def _is_reference(text: str, start: int) -> bool:
    return bool(_REFERENCE_BEFORE.search(text[max(0, start - 24) : start]))


# Words that name an identifier when they stand just before it (English, German, French, Spanish).
LABELS: dict[str, str] = {
    "PHONE": r"phone|tel|telephone|mobile|cell|whatsapp|fax|sms|text me|call me|landline|telefon|handy|"
    r"téléphone|portable|teléfono|móvil|celular",
    "CREDIT_CARD": r"card|visa|master\s?card|amex|american express|maestro|kreditkarte|tarjeta|carte|cartão",
    "IBAN": r"iban|bank|account|konto|kontonummer|cuenta|compte|rib",
    "IP_ADDRESS": r"ip|ipv4|ipv6|ip address|ip-adresse|adresse ip|dirección ip|direccion ip",
    "US_SSN": r"ssn|ss#|social security|soc\.?\s?sec|seguro social|itin",
    "UK_NINO": r"nino|ni number|ni no|national insurance",
    "UK_NHS": r"nhs",
    "DE_TAX_ID": r"steuer-?id|steuer-?idnr|idnr|steueridentifikationsnummer|identifikationsnummer|tax id|"
    r"tax identification",
    "FR_NIR": r"nir|insee|sécurité sociale|securite sociale|sécu|secu|social security",
    "ES_DNI": r"dni|nie|nif|documento nacional",
    "IN_AADHAAR": r"aadhaar|aadhar|uidai",
    "IN_PAN": r"pan|permanent account number",
}
_LABEL_RX = {kind: re.compile(rf"(?i)(?<!\w)(?:{words})(?!\w)") for kind, words in LABELS.items()}
LABEL_WINDOW = 40  # characters before a value searched for its label


def label_distance(kind: str, text: str, start: int) -> int | None:
    """Characters between the nearest word naming ``kind`` (see :data:`LABELS`) and ``start``, when one
    ends in the 40 characters before ``start``; None otherwise."""
    window = text[max(0, start - LABEL_WINDOW) : start]
    ends = [m.end() for m in _LABEL_RX[kind].finditer(window)]
    return len(window) - ends[-1] if ends else None


def labelled(kind: str, text: str, start: int) -> bool:
    """Whether a word naming ``kind`` stands in the 40 characters before ``start``."""
    return label_distance(kind, text, start) is not None


def _placeholder(value: str) -> bool:
    """``000-00-0000``, ``XXXX XXXX XXXX XXXX``: one character repeated is a template, not a value."""
    return len(set(re.sub(r"[\W_]", "", value).upper())) <= 1


Span = tuple[int, int, bool | None]  # (start, end, passed the validity check; None: the type has none)
Finder = Callable[[str], Iterable[Span]]


def _identifier(kind: str, pattern: str, check: Callable[[str], bool]) -> Finder:
    """Values of ``pattern`` that pass ``check``, or fail it but are labelled (see the module docstring)."""
    rx = re.compile(pattern)

    def find(text: str) -> Iterable[Span]:
        for m in rx.finditer(text):
            if _placeholder(m.group(0)) or _is_reference(text, m.start()):
                continue
            valid = check(m.group(0))
            if valid or labelled(kind, text, m.start()):
                yield m.start(), m.end(), valid

    return find


def _unchecked(spans: Callable[[str], Iterable[tuple[int, int]]]) -> Finder:
    """A finder for a type without a validity check."""
    return lambda text: ((s, e, None) for s, e in spans(text))


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _luhn_card(s: str) -> bool:
    from stdnum import luhn

    d = _digits(s)
    return 13 <= len(d) <= 19 and luhn.is_valid(d)


def _iban(s: str) -> bool:
    from stdnum import iban

    return bool(iban.is_valid(s))


def _ip(s: str) -> bool:
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    return not (ip.version == 4 and s.count(".") != 3)


def _stdnum(module: str) -> Callable[[str], bool]:
    def check(s: str) -> bool:
        import importlib

        mod = importlib.import_module(f"stdnum.{module}")
        return bool(mod.is_valid(s))

    return check


_NINO_BAD_PREFIX = {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}


def _nino(s: str) -> bool:
    c = re.sub(r"\s", "", s).upper()
    return (
        len(c) == 9
        and c[0] not in "DFIQUV"
        and c[1] not in "DFIOQUV"
        and c[:2] not in _NINO_BAD_PREFIX
        and c[8] in "ABCD"
    )


def _es_dni(s: str) -> bool:
    from stdnum.es import dni, nie

    return bool(dni.is_valid(s) or nie.is_valid(s))


_NHS_RX = re.compile(r"\b\d{3}([ -]?)\d{3}\1\d{4}\b")


def _nhs(text: str) -> Iterable[Span]:
    """NHS numbers: formatted 3-3-4 with a valid check digit, or any 10 digits after the word NHS
    (1 in 11 random 10-digit numbers passes the check digit, so bare digits need that label)."""
    from stdnum.gb import nhs

    for m in _NHS_RX.finditer(text):
        if _placeholder(m.group(0)) or _is_reference(text, m.start()):
            continue
        valid = bool(nhs.is_valid(m.group(0)))
        if (valid and m.group(1)) or labelled("UK_NHS", text, m.start()):
            yield m.start(), m.end(), valid


_PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IN")
_PHONE_WORDS = re.compile(
    r"(?i)(?:phone|tel|call|mobile|cell|whatsapp|fax|sms|text me|ring|number|telefon|téléphone|teléfono|móvil|handy)"
)
_MIN_PHONE_DIGITS = 7  # the shortest subscriber numbers written with their area code
_DIGIT_RUN = re.compile(r"\d[\d\s().+/-]{5,}\d")


def _phones(text: str) -> Iterable[Span]:
    """Valid numbers (``phonenumbers``) that are formatted or follow a phone word; then numbers of a
    possible length that are not valid (unassigned ranges, fictional 555 numbers) after a label."""
    if not _DIGIT_RUN.search(text):
        return
    import phonenumbers

    seen: list[tuple[int, int]] = []
    for region in _PHONE_REGIONS:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            span = (match.start, match.end)
            if span in seen or _placeholder(match.raw_string) or _is_reference(text, match.start):
                continue
            # a bare run of digits is a phone number only when something says so
            formatted = bool(re.search(r"[+()\s.-]", match.raw_string))
            if formatted or _PHONE_WORDS.search(text[max(0, match.start - 30) : match.start]):
                seen.append(span)
                yield match.start, match.end, True
    if not _LABEL_RX["PHONE"].search(text):
        return
    for region in _PHONE_REGIONS:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
            s, e = match.start, match.end
            if any(s < te and ts < e for ts, te in seen) or _placeholder(match.raw_string):
                continue
            # a phone number's length, not "15" in "phone: 15 MB"
            shaped = len(_digits(match.raw_string)) >= _MIN_PHONE_DIGITS
            if shaped and not _is_reference(text, s) and labelled("PHONE", text, s):
                seen.append((s, e))
                yield s, e, False


_EMAIL_RX = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")

# (type, finder); between overlapping findings equally labelled and checked, the earlier type wins
_DETECTORS: list[tuple[str, Finder]] = [
    ("EMAIL", _unchecked(lambda t: (m.span() for m in _EMAIL_RX.finditer(t)))),
    ("IBAN", _identifier("IBAN", r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b", _iban)),
    # national ids with strict formats before cards: a 15-digit NIR can pass Luhn by chance
    (
        "FR_NIR",
        _identifier("FR_NIR", r"\b[12]\s?\d{2}\s?\d{2}\s?(?:\d{2}|2A|2B)\s?\d{3}\s?\d{3}\s?\d{2}\b", _stdnum("fr.nir")),
    ),
    ("CREDIT_CARD", _identifier("CREDIT_CARD", r"\b(?:\d[ -]?){12,18}\d\b", _luhn_card)),
    ("US_SSN", _identifier("US_SSN", r"\b\d{3}-\d{2}-\d{4}\b", _stdnum("us.ssn"))),
    ("UK_NINO", _identifier("UK_NINO", r"\b[A-Z]{2}\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b", _nino)),
    ("UK_NHS", _nhs),
    ("DE_TAX_ID", _identifier("DE_TAX_ID", r"\b\d{2}\s?\d{3}\s?\d{3}\s?\d{3}\b", _stdnum("de.idnr"))),
    ("ES_DNI", _identifier("ES_DNI", r"\b[XYZ]?\d{7,8}-?[A-Z]\b", _es_dni)),
    ("IN_AADHAAR", _identifier("IN_AADHAAR", r"\b[2-9]\d{3}\s?\d{4}\s?\d{4}\b", _stdnum("in_.aadhaar"))),
    ("IN_PAN", _identifier("IN_PAN", r"\b[A-Z]{5}\d{4}[A-Z]\b", _stdnum("in_.pan"))),
    (
        "IP_ADDRESS",
        _identifier("IP_ADDRESS", r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}\b", _ip),
    ),
    ("PHONE", _phones),
    ("POSTAL_ADDRESS", _unchecked(find_addresses)),
    ("PERSON", _unchecked(find_persons)),
]


def find_pii(text: str, types: Iterable[str] = PII_TYPES) -> list[Finding]:
    """Every piece of personal data in ``text``, without overlaps, in order of position.

    Where two findings overlap, the one with the nearest label before it wins (the writer said what
    it is), then the one that passes its check, then the type listed first in ``_DETECTORS``
    (stricter formats first).
    """
    wanted = set(types)
    # sort key: nearest label first (the writer said what it is), then a passed check, then priority
    found: list[tuple[int, bool, int, int, int, Finding]] = []
    for priority, (kind, finder) in enumerate(_DETECTORS):
        if kind not in wanted:
            continue
        for s, e, valid in finder(text):
            if e > s:
                distance = label_distance(kind, text, s) if kind in LABELS else None
                f = Finding(kind, s, e, text[s:e], valid, distance is not None)
                unnamed = LABEL_WINDOW + 1  # sorts after every labelled finding
                found.append((unnamed if distance is None else distance, valid is not True, priority, s, -e, f))
    out: list[Finding] = []
    taken: list[tuple[int, int]] = []
    for *_, f in sorted(found, key=lambda t: t[:5]):
        if not any(f.start < te and ts < f.end for ts, te in taken):
            taken.append((f.start, f.end))
            out.append(f)
    return sorted(out, key=lambda f: f.start)


class Redactor:
    """Replaces findings with typed placeholders, ``<EMAIL_1>``, ``<PERSON_2>``…

    One redactor per example: the same value gets the same placeholder everywhere in the example
    (so a conversation stays coherent), different values get different numbers.
    """

    def __init__(self, existing_text: str = "") -> None:
        self.placeholders: dict[tuple[str, str], str] = {}
        self.counts: Counter[str] = Counter()
        # text redacted before keeps its placeholders: new numbers start after the highest one
        for kind, n in re.findall(r"<([A-Z_]+)_(\d+)>", existing_text):
            self.counts[kind] = max(self.counts[kind], int(n))

    def redact(self, text: str, findings: list[Finding]) -> str:
        parts, pos = [], 0
        for f in findings:
            key = (f.type, f.text)
            if key not in self.placeholders:
                self.counts[f.type] += 1
                self.placeholders[key] = f"<{f.type}_{self.counts[f.type]}>"
            parts.extend([text[pos : f.start], self.placeholders[key]])
            pos = f.end
        parts.append(text[pos:])
        return "".join(parts)
