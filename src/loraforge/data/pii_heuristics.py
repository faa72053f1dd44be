"""Personal data found by heuristics rather than by pattern and check: person names and postal addresses.

Without a language model a name is a known first name (``gender-guesser``'s international list)
followed by capitalised name words, or a title and a name; an address is a house number and a street
of a known type (English, German, French, Spanish, Italian). Word lists keep the common false
friends out ("Olive Oil", "Will", "May"). Precision and recall are measured on the gold set in
``tests/data/test_pii.py``; :mod:`loraforge.data.pii` runs these finders with the structured ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable

_STREET_TYPES = (
    r"Street|St\.?|Road|Rd\.?|Avenue|Ave\.?|Lane|Ln\.?|Boulevard|Blvd\.?|Drive|Dr\.?|Way|Court|Ct\.?|"
    r"Place|Pl\.?|Terrace|Close|Crescent|Square|Sq\.?|Highway|Hwy\.?|Parkway|Pkwy\.?"
)
_ADDRESS_PATTERNS = [
    # 221B Baker Street, 14 Harbor Lane, 1600 Pennsylvania Avenue NW
    rf"\b\d{{1,5}}[A-Za-z]?,?\s+(?:[A-Z][\w'-]*\.?\s+){{1,4}}(?:{_STREET_TYPES})\b(?:\s+(?:NW|NE|SW|SE|N|S|E|W)\b)?"
    r"(?:,?\s+(?:Apt|Suite|Unit|Flat)\.?\s*\w+)?",
    # Hauptstraße 5, Lindenallee 12a, Am Markt 3 (German)
    r"\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|allee|platz|gasse|damm)\s+\d{1,4}[a-z]?\b",
    # 12 rue de la Paix, 3 avenue Victor Hugo (French)
    r"\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|av\.|boulevard|bd|place|impasse|allée|chemin|quai)\s+"
    r"(?:(?:de|du|des|la|le|l'|d')\s*)*[A-ZÉ][\w'-]+(?:\s+[A-ZÉ][\w'-]+)*",
    # Calle Mayor 3, Avenida de América 10, Via Roma 12 (Spanish, Italian)
    r"\b(?:Calle|C/|Avenida|Avda\.|Paseo|Plaza|Via|Viale|Piazza|Corso)\s+(?:(?:de|del|de la|di|della)\s+)?"
    r"[A-ZÁÉÍÓÚ][\w'-]+(?:\s+[A-ZÁÉÍÓÚ][\w'-]+)*,?\s+(?:n\.?º\s*)?\d{1,4}\b",
]
_ADDRESS_RX = [re.compile(p) for p in _ADDRESS_PATTERNS]
_TITLES = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Herr|Frau|Mme|Mlle|M\.|Sr|Sra|Srta|Don|Doña)\.?"
_NAME_WORD = r"[A-ZÀ-ÖØ-Þ][a-zà-öø-ÿ'’]+(?:-[A-ZÀ-ÖØ-Þ][a-zà-öø-ÿ'’]+)*"
_PARTICLE = r"(?:\s+(?:van der|van|von|de la|de|da|del|di|le|la)\s+|\s+)"
_TITLE_NAME_RX = re.compile(rf"\b{_TITLES}\s+{_NAME_WORD}(?:{_PARTICLE}{_NAME_WORD}){{0,3}}")
# A first name, then one to three more name words ("Anna Maria Schmidt", "Juan Carlos Rodríguez Pérez").
_CAP_PAIR_RX = re.compile(rf"(?<![\w-])(?=({_NAME_WORD})((?:{_PARTICLE}{_NAME_WORD}){{1,3}}))")
# Words that make "First Second" a thing rather than a person ("Olive Oil", "Ruby Red", "Max Pro").
_NOT_SURNAMES = {
    "Oil",
    "Ale",
    "Red",
    "Blue",
    "Green",
    "White",
    "Black",
    "Grey",
    "Gray",
    "Pink",
    "Gold",
    "Silver",
    "Day",
    "Days",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Period",
    "Station",
    "Avenue",
    "Street",
    "Road",
    "Lane",
    "Beach",
    "Alert",
    "Clear",
    "Scanner",
    "League",
    "Sports",
    "Jar",
    "Boots",
    "Pro",
    "Max",
    "Plus",
    "Ultra",
    "Mini",
    "Lite",
    "Air",
    "Edition",
    "Series",
    "Model",
    "Plan",
    "Care",
    "City",
    "Trek",
    "Cargo",
    "Classic",
    "Sprint",
    "Park",
    "Hotel",
    "Airport",
    "Bridge",
    "Square",
}
# Capitalised words that are first names in some culture but rarely names in prose.
_NOT_NAMES = {
    "Will",
    "May",
    "June",
    "April",
    "August",
    "Mark",
    "Bill",
    "Grant",
    "Rose",
    "Hope",
    "Faith",
    "Joy",
    "Summer",
    "Sunny",
    "Page",
    "Chase",
    "Dean",
    "Guy",
    "Art",
    "Ray",
    "Gene",
    "Lane",
    "Lee",
    "Dale",
    "Glen",
    "Brook",
    "Hi",
    "Hello",
    "Dear",
    "Thanks",
    "Thank",
    "Yes",
    "No",
    "Please",
    "Sorry",
    "The",
    "This",
    "That",
    "Our",
    "Your",
    "My",
    "Do",
    "So",
    "Can",
    "Is",
    "It",
    "In",
    "On",
    "At",
    "An",
    "As",
    "Be",
    "By",
    "Go",
    "He",
    "If",
    "Me",
    "Of",
    "Or",
    "To",
    "Up",
    "Us",
    "We",
    "Am",
    "Are",
    "Was",
    "Has",
    "Had",
    "Did",
    "Get",
    "Got",
    "Let",
    "Not",
    "But",
    "And",
    "For",
    "How",
    "Why",
    "Who",
    "What",
    "When",
    "Where",
    "Which",
    "Any",
    "All",
    "Also",
    "Just",
    "New",
    "Best",
    "Kind",
    "Happy",
    "Merry",
    "Good",
    "Great",
    "Call",
    "Ask",
    "See",
}


@functools.cache
def _first_names() -> Callable[[str], bool]:
    import gender_guesser.detector as gender

    detector = gender.Detector(case_sensitive=True)
    return lambda word: word not in _NOT_NAMES and detector.get_gender(word) != "unknown"


def find_persons(text: str) -> Iterable[tuple[int, int]]:
    """``(start, end)`` of every likely person name in ``text``: a title and a name, or a known first name
    and more name words; spans may overlap (``find_pii`` keeps one of overlapping findings)."""
    for m in _TITLE_NAME_RX.finditer(text):
        yield m.span()
    is_first = _first_names()
    for m in _CAP_PAIR_RX.finditer(text):  # overlapping: "I'm Maria Garcia" tries "Maria Garcia" too
        words = m.group(2).split()
        if is_first(m.group(1).split("-")[0]) and words[0] not in _NOT_SURNAMES:
            yield m.start(1), m.end(2)


def find_addresses(text: str) -> Iterable[tuple[int, int]]:
    """``(start, end)`` of every likely postal address in ``text`` (house number and street)."""
    for rx in _ADDRESS_RX:
        for m in rx.finditer(text):
            yield m.span()
