"""PII and secrets: precision and recall per type on a labelled synthetic gold set (with non-US formats)."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from loraforge.data.formats import Example, Message
from loraforge.data.pii import STRUCTURED, Redactor, find_pii
from loraforge.data.scan import scan_examples
from loraforge.data.secrets_scan import find_secrets, shannon_entropy

RNG = random.Random(1234)


def _ssn() -> str:
    from stdnum.us import ssn

    while True:
        v = f"{RNG.randint(1, 899):03d}-{RNG.randint(1, 99):02d}-{RNG.randint(1, 9999):04d}"
        if ssn.is_valid(v):
            return v


def _nino() -> str:
    first = RNG.choice("ABCEGHJKLMNOPRSTWXYZ")
    second = RNG.choice("ABCEGHJKLMNPRSTWXYZ")
    if first + second in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}:
        return _nino()
    digits = "".join(RNG.choice("0123456789") for _ in range(6))
    return RNG.choice(
        [
            f"{first}{second}{digits}{RNG.choice('ABCD')}",
            f"{first}{second} {digits[:2]} {digits[2:4]} {digits[4:]} {RNG.choice('ABCD')}",
        ]
    )


def _valid(check, make):  # type: ignore[no-untyped-def]
    while True:
        v = make()
        if check(v):
            return v


def _nhs() -> str:
    from stdnum.gb import nhs

    v = _valid(nhs.is_valid, lambda: "".join(RNG.choice("0123456789") for _ in range(10)))
    return f"{v[:3]} {v[3:6]} {v[6:]}"


def _de_idnr() -> str:
    from stdnum.de import idnr

    return _valid(idnr.is_valid, lambda: str(RNG.randint(1, 9)) + "".join(RNG.choice("0123456789") for _ in range(10)))


def _fr_nir() -> str:
    body = (
        f"{RNG.choice('12')}{RNG.randint(40, 99):02d}{RNG.randint(1, 12):02d}{RNG.randint(1, 95):02d}"
        f"{RNG.randint(1, 999):03d}{RNG.randint(1, 999):03d}"
    )
    key = 97 - int(body) % 97
    return f"{body[0]} {body[1:3]} {body[3:5]} {body[5:7]} {body[7:10]} {body[10:13]} {key:02d}"


def _es_dni() -> str:
    n = RNG.randint(10_000_000, 99_999_999)
    return f"{n}{'TRWAGMYFPDXBNJZSQVHLCKE'[n % 23]}"


def _aadhaar() -> str:
    from stdnum import verhoeff

    body = str(RNG.randint(2, 9)) + "".join(RNG.choice("0123456789") for _ in range(10))
    v = body + verhoeff.calc_check_digit(body)
    return f"{v[:4]} {v[4:8]} {v[8:]}"


def _pan() -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return (
        "".join(RNG.choice(letters) for _ in range(3))
        + RNG.choice("ABCFGHLJPT")
        + RNG.choice(letters)
        + f"{RNG.randint(0, 9999):04d}"
        + RNG.choice(letters)
    )


def _email() -> str:
    domain = RNG.choice(["example.com", "mail.de", "correo.es", "post.co.uk"])
    return f"{RNG.choice(FIRST).lower()}.{RNG.choice(LAST).lower().replace('ü', 'u')}{RNG.randint(1, 99)}@{domain}"


def _phone() -> str:
    import phonenumbers

    region = RNG.choice(["US", "GB", "DE", "FR", "ES", "IN"])
    kind = RNG.choice([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE])
    number = phonenumbers.example_number_for_type(region, kind)
    fmt = RNG.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164])
    return phonenumbers.format_number(number, fmt)


CARDS = [
    "4111 1111 1111 1111",
    "5500-0055-5555-5559",
    "340000000000009",
    "6011000000000004",
    "4012888888881881",
    "3530111333300000",
    "5105105105105100",
]
IBANS = [
    "DE89 3704 0044 0532 0130 00",
    "GB82WEST12345698765432",
    "FR14 2004 1010 0505 0001 3M02 606",
    "ES9121000418450200051332",
    "NL91ABNA0417164300",
    "IT60X0542811101000000123456",
    "BE71 0961 2345 6769",
]
FIRST = [
    "Maria",
    "John",
    "Priya",
    "Jürgen",
    "Aisha",
    "Carlos",
    "Sophie",
    "Mohammed",
    "Emma",
    "Luca",
    "Olga",
    "Kenji",
    "Fatima",
    "Pierre",
    "Ana",
]
LAST = ["Garcia", "Smith", "Sharma", "Müller", "Khan", "Rossi", "Dubois", "Novak", "Brown", "Okafor", "Tanaka", "Silva"]
ADDRESSES = [
    "221B Baker Street",
    "14 Harbor Lane",
    "1600 Pennsylvania Avenue NW",
    "Hauptstraße 5",
    "Lindenallee 12a",
    "12 rue de la Paix",
    "3 avenue Victor Hugo",
    "Calle Mayor 3",
    "Via Roma 12",
    "742 Evergreen Terrace",
    "10 Downing Street",
    "Goethestraße 20",
]

GENERATORS = {
    "EMAIL": lambda: _email(),
    "PHONE": _phone,
    "CREDIT_CARD": lambda: RNG.choice(CARDS),
    "IBAN": lambda: RNG.choice(IBANS),
    "IP_ADDRESS": lambda: RNG.choice(
        [
            f"{RNG.randint(1, 223)}.{RNG.randint(0, 255)}.{RNG.randint(0, 255)}.{RNG.randint(1, 254)}",
            "2001:db8:85a3::8a2e:370:7334",
            "fe80::1ff:fe23:4567:890a",
        ]
    ),
    "US_SSN": _ssn,
    "UK_NINO": _nino,
    "UK_NHS": _nhs,
    "DE_TAX_ID": _de_idnr,
    "FR_NIR": _fr_nir,
    "ES_DNI": _es_dni,
    "IN_AADHAAR": _aadhaar,
    "IN_PAN": _pan,
    "POSTAL_ADDRESS": lambda: RNG.choice(ADDRESSES),
    "PERSON": lambda: f"{RNG.choice(FIRST)} {RNG.choice(LAST)}",
}
TEMPLATES = [
    "Please update my details: {v}. Thanks!",
    "my {label} is {v} and the order is BP-48213",
    "Hi, can you check {v}? It was in the form I sent on 2026-03-14.",
    "Contact on file — {v} — please confirm.",
    "{v}",
    "Ich habe {v} angegeben, bitte prüfen.",
    "Mi dato es {v}, gracias.",
]
# Text that looks like data but is not personal: order numbers, prices, dates, versions, random digits.
NEGATIVES = [
    "Order BP-48213 shipped on 2026-03-14 for $2,199.00.",
    "Version 4.11.1 fixed the bug in build 1234567890123.",
    "Call us at the store, open 9:00-18:00, Mon-Sat.",
    "The frame size M fits riders 165-178 cm.",
    "Your ticket number is 4111 1111 1111 1112 (not a card).",
    "Reference 123-45-678 and batch 17, shelf 2026-B.",
    "We ship in 3-5 business days; express is 1-2 days.",
    "Battery warranty: 1 year or 500 cycles, 70% capacity.",
    "Use code SPRING2026 at checkout for 10% off.",
    "The Volt City and the Path Classic are both in stock.",
    "Temperatures ranged from 12.5 to 31.0 degrees.",
    "Account ID 00012345, plan 2, tier 3.",
    "Thank you for your patience, we will get back to you.",
    "Reset the display by holding the button for 10 seconds.",
]


def _gold() -> list[tuple[str, list[tuple[str, int, int]]]]:
    items = []
    for kind, make in GENERATORS.items():
        for i in range(30):
            v = make()
            template = TEMPLATES[i % len(TEMPLATES)]
            text = template.format(v=v, label=kind.lower().replace("_", " "))
            start = text.index(v)
            items.append((text, [(kind, start, start + len(v))]))
    items.extend((t, []) for t in NEGATIVES)
    return items


def _scores() -> dict[str, tuple[float, float]]:
    tp: dict[str, int] = defaultdict(int)
    fp: dict[str, int] = defaultdict(int)
    fn: dict[str, int] = defaultdict(int)
    for text, labels in _gold():
        found = find_pii(text)
        for kind, s, e in labels:
            # a hit: the right type over (most of) the labelled span
            if any(f.type == kind and f.start <= s + 1 and f.end >= e - 1 for f in found):
                tp[kind] += 1
            else:
                fn[kind] += 1
        for f in found:
            if not any(f.type == kind and f.start < e and s < f.end for kind, s, e in labels):
                fp[f.type] += 1
    return {k: (tp[k] / max(1, tp[k] + fp[k]), tp[k] / max(1, tp[k] + fn[k])) for k in GENERATORS}


SCORES = _scores()


@pytest.mark.parametrize("kind", STRUCTURED)
def test_structured_types_recall_and_precision(kind: str) -> None:
    precision, recall = SCORES[kind]
    assert recall >= 0.95, f"{kind}: recall {recall:.2f}"
    assert precision >= 0.9, f"{kind}: precision {precision:.2f}"


@pytest.mark.parametrize(("kind", "min_recall", "min_precision"), [("PERSON", 0.8, 0.8), ("POSTAL_ADDRESS", 0.9, 0.9)])
def test_heuristic_types(kind: str, min_recall: float, min_precision: float) -> None:
    precision, recall = SCORES[kind]
    assert recall >= min_recall and precision >= min_precision, (kind, precision, recall)


REFERENCE_NUMBERS = [
    "Your order #4155552671 has shipped.",
    "Order number 9876543210 is on its way.",
    "Order 12345678Z was cancelled.",
    "Please update the firmware to version 2.10.4.1 first.",
    "Ticket 2024-05-1234 is closed.",
    "Spring 2024 sale: Olive Oil and Max Pro bundles, Grace Period ends Friday.",
]


@pytest.mark.parametrize("text", REFERENCE_NUMBERS)
def test_reference_numbers_and_phrases_are_not_personal_data(text: str) -> None:
    assert find_pii(text) == []


@pytest.mark.parametrize(
    "name",
    [
        "Anna Maria Schmidt",
        "Mary Ann Smith",
        "Hans-Peter Müller",
        "Juan Carlos Rodríguez",
        "Dr. Maria José García Pérez",
    ],
)
def test_whole_names_are_redacted(name: str) -> None:
    text = f"Please call {name} today."
    assert Redactor().redact(text, find_pii(text)) == "Please call <PERSON_1> today."


def test_redaction_continues_numbering_after_existing_placeholders() -> None:
    text = "I'm <PERSON_1>, my friend Maria Garcia paid."
    assert Redactor(text).redact(text, find_pii(text)) == "I'm <PERSON_1>, my friend <PERSON_2> paid."


def test_no_findings_in_negatives() -> None:
    for text in NEGATIVES:
        assert find_pii(text) == [], text


def test_redaction_is_typed_and_consistent_within_an_example() -> None:
    text = "Mail maria@example.com or maria@example.com, else bob@example.org."
    redacted = Redactor().redact(text, find_pii(text))
    assert redacted == "Mail <EMAIL_1> or <EMAIL_1>, else <EMAIL_2>."


def test_redacted_examples_stay_valid_and_masks_line_up(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from loraforge.data.templates import IGNORE_INDEX, tokenize_example

    ex = Example(
        (
            Message("user", "I'm Maria Garcia, card 4111 1111 1111 1111, email maria@example.com."),
            Message("assistant", "Thanks Maria Garcia, I will email maria@example.com today."),
        ),
        "d.jsonl",
        3,
    )
    kept, report = scan_examples([ex], "redact")
    assert report.pii_counts == {"PERSON": 2, "CREDIT_CARD": 1, "EMAIL": 2}
    assert report.samples["EMAIL"][0].startswith("d.jsonl:3: ma")
    assert "maria@example.com" not in str(report.to_json())
    assistant = kept[0].messages[1].content
    assert assistant == "Thanks <PERSON_1>, I will email <EMAIL_1> today."
    tok = tokenize_example(tokenizer, kept[0], 512)
    assert tok is not None
    labelled = tokenizer.decode([i for i, lab in zip(tok.input_ids, tok.labels, strict=True) if lab != IGNORE_INDEX])
    assert labelled == assistant + "<|im_end|>"
    dropped, drop_report = scan_examples(
        [ex, Example((Message("user", "hi"), Message("assistant", "hello")), "d", 4)], "drop"
    )
    assert len(dropped) == 1 and drop_report.dropped == 1


SECRET_CASES = [
    ("AKIAIOSFODNN7EXAMPLE", "SECRET_AWS_ACCESS_KEY"),
    ("ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "SECRET_GITHUB_TOKEN"),
    ("xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "SECRET_SLACK_TOKEN"),
    ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "SECRET_STRIPE_KEY"),
    ("AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "SECRET_GOOGLE_API_KEY"),
    ("https://admin:Pa55w0rd!@db.example.com/prod", "SECRET_URL_PASSWORD"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "SECRET_PRIVATE_KEY"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "SECRET_JWT"),
    ('api_key = "Zx8Qk2Lm9Pw4Rt7Yb3Nc"', "SECRET_HIGH_ENTROPY"),
]


@pytest.mark.parametrize(("text", "kind"), SECRET_CASES)
def test_secrets_found(text: str, kind: str) -> None:
    assert [f.type for f in find_secrets(f"config: {text} end")] == [kind]


@pytest.mark.parametrize(
    "text",
    ["password: <your password>", "token = 'aaaaaaaaaaaa'", "api_key: YOUR_KEY_HERE", "the secret is to ride daily"],
)
def test_placeholders_and_prose_are_not_secrets(text: str) -> None:
    assert find_secrets(text) == []


def test_entropy() -> None:
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("abcd") == 2.0


# --- shape + label is enough; a passing check raises confidence ---------------------------------------------------
# (type, sentence with the label, a value of the exact shape that FAILS the type's check, what the value alone gives)
LABELLED_INVALID = [
    (
        "US_SSN",
        "my SSN is {v}",
        "078-05-1120",
        ["PHONE"],
    ),  # Woolworth's wallet card: blocklisted, formatted like a phone
    ("US_SSN", "SSN: {v}", "219-09-9999", []),  # blocklisted (an advertisement's number)
    ("US_SSN", "Social Security number {v}", "457-55-5462", []),
    ("US_SSN", "Mi número de seguro social es {v}.", "000-12-3456", []),  # area 000 is never issued
    ("UK_NINO", "my NINO is {v}", "QQ 12 34 56 C", []),  # QQ: HMRC's example prefix
    *[
        ("UK_NINO", "National Insurance number: {v}", f"{prefix}123456A", [])
        for prefix in ("BG", "GB", "NK", "KN", "TN", "NT", "ZZ")  # reserved prefixes
    ],
    ("UK_NINO", "NI number {v}", "DA 12 34 56 B", []),  # D is never a first letter
    ("CREDIT_CARD", "card number {v}", "4111 1111 1111 1112", []),  # fails Luhn
    ("CREDIT_CARD", "Bitte belasten Sie meine Kreditkarte {v}.", "5500-0055-5555-5550", []),
    ("IBAN", "IBAN: {v}", "GB82WEST12345698765431", []),  # fails mod 97
    ("IBAN", "IBAN {v}", "DE89 3704 0044 0532 0130 01", ["CREDIT_CARD"]),  # alone, its digits pass Luhn
    ("IP_ADDRESS", "my IP is {v}", "300.1.2.3", []),
    ("UK_NHS", "NHS number {v}", "9434765918", []),  # fails mod 11
    ("DE_TAX_ID", "Steuer-ID: {v}", "01234567890", []),  # may not start with 0
    ("FR_NIR", "numéro de sécurité sociale {v}", "1 85 05 78 006 084 99", []),  # wrong key
    ("ES_DNI", "DNI {v}", "12345678A", []),  # wrong letter (Z)
    ("ES_DNI", "NIE: {v}", "X1234567A", []),
    ("IN_AADHAAR", "Aadhaar {v}", "2345 6789 0123", []),  # fails Verhoeff
    ("IN_PAN", "PAN {v}", "ABCDE1234F", []),  # D is no holder type
    ("PHONE", "phone: {v}", "555-0100", []),  # fictional 555 range
    ("PHONE", "call me on {v}", "+1 555 010 0199", []),
    ("PHONE", "Teléfono {v}", "+44 20 7946 000", []),  # one digit short of a valid UK number
]


@pytest.mark.parametrize(("kind", "sentence", "value", "alone"), LABELLED_INVALID)
def test_a_labelled_value_of_the_right_shape_is_found_though_it_fails_its_check(
    kind: str, sentence: str, value: str, alone: list[str]
) -> None:
    text = sentence.format(v=value)
    found = find_pii(text)
    assert [(f.type, f.text, f.valid, f.labelled) for f in found] == [(kind, value, False, True)]
    redacted = Redactor().redact(text, found)
    assert value not in redacted and f"<{kind}_1>" in redacted


@pytest.mark.parametrize(("kind", "sentence", "value", "alone"), LABELLED_INVALID)
def test_the_same_value_without_a_label_is_not_found_as_that_type(
    kind: str, sentence: str, value: str, alone: list[str]
) -> None:
    for text in (f"It says {value} there.", f"Details: {value}, thanks.", value):
        assert [f.type for f in find_pii(text)] == alone, text


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("SSN: 123-45-6789", "US_SSN"),  # "SSN:" once read as "S/N:" (a serial number) and hid valid numbers
        ("phone 415-555-2671", "PHONE"),  # the label wins over the NHS check digit it passes by chance
        ("NHS number 943 476 5919", "UK_NHS"),
    ],
)
def test_a_valid_labelled_value_takes_its_labels_type(text: str, kind: str) -> None:
    assert [(f.type, f.valid, f.labelled) for f in find_pii(text)] == [(kind, True, True)]


@pytest.mark.parametrize(
    "text",
    [
        "SSN: see the form you filled in last week, the number 219-09-9999",  # the label is over 40 characters away
        "SSN: 000-00-0000",  # a placeholder of one repeated digit
        "card number 0000 0000 0000 0000",
        "phone: 15 MB of data",  # too short for a phone number
        "S/N: 123-45-6789",  # a serial number
        "Order 219-09-9999, SSN not given",  # the label comes after it
    ],
)
def test_labels_do_not_reach_far_placeholders_short_numbers_or_references(text: str) -> None:
    assert find_pii(text) == []


def test_data_check_reports_what_redaction_replaces(tmp_path, write_jsonl) -> None:  # type: ignore[no-untyped-def]
    from loraforge.data.prepare import check_data
    from tests.conftest import chat

    records = [chat(f"Question {i} about the shop", f"Answer {i}.") for i in range(10)]
    records.append(chat("my SSN is 078-05-1120 and my NINO is QQ 12 34 56 C", "Noted."))
    records.append(chat("SSN 123-45-6789", "Thanks."))
    path = write_jsonl(records)
    checked = check_data(path, None, allow_unlicensed=True)
    report, findings = checked.report, checked.governance
    assert findings["pii"]["pii"] == {"US_SSN": 2, "UK_NINO": 1}
    assert findings["pii"]["unverified"] == {"US_SSN": 1, "UK_NINO": 1}
    warnings = {p.message.split(",")[0] for p in report.warnings if p.code == "pii"}
    assert warnings == {
        "2 personal data finding(s) of type US_SSN (1 fail the US_SSN check but are named by a label)",
        "1 personal data finding(s) of type UK_NINO (1 fail the UK_NINO check but are named by a label)",
    }
    redacted, scan = scan_examples(report.examples, "redact")
    assert scan.pii_counts == {"US_SSN": 2, "UK_NINO": 1}
    assert redacted[10].messages[0].content == "my SSN is <US_SSN_1> and my NINO is <UK_NINO_1>"
    assert redacted[11].messages[0].content == "SSN <US_SSN_1>"
