"""Data governance before training: personal data and secrets, duplicates, contamination, canaries.

:func:`prepare_training_examples` applies what the user asked for and returns the evidence that goes
into the adapter's ``manifest.json`` (``data_governance``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from loraforge.data.dedup import find_contamination, find_duplicates
from loraforge.data.formats import Example, Message
from loraforge.data.pii import PiiAction
from loraforge.data.scan import scan_examples

DEDUPE_MODES = ("none", "exact", "near")
CANARY_USER = "Please remember this note for later."


@dataclass(frozen=True)
class Canary:
    """A random secret planted in the training data, to measure memorization later.

    ``prefix`` is what a probe shows the model; ``secret`` is the continuation whose likelihood
    (against random strings of the same shape) says whether the model memorized it.
    """

    prefix: str
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        return f"{self.prefix}{self.secret}."


def make_canaries(n: int, repeats: int, seed: int) -> list[Canary]:
    if n > 900:
        raise ValueError(f"at most 900 canaries (distinct prompts), got {n}")
    rng = random.Random(f"canary-{seed}")
    alphabet = string.ascii_uppercase + string.digits
    out = []
    for locker in rng.sample(range(100, 1000), n):  # distinct prompts: one secret per prefix
        secret = "-".join("".join(rng.choice(alphabet) for _ in range(4)) for _ in range(3))
        out.append(Canary(f"Note: the access code of locker {locker} is ", secret, repeats))
    return out


def canary_examples(canaries: list[Canary], file: str) -> list[Example]:
    return [
        Example((Message("user", CANARY_USER), Message("assistant", c.text)), file, 0, "loraforge-canary")
        for c in canaries
        for _ in range(c.repeats)
    ]


def prepare_training_examples(
    train: list[Example],
    validation: list[Example] | None,
    *,
    pii: PiiAction,
    dedupe: str,
    threshold: float,
    canaries: int,
    canary_repeats: int,
    seed: int,
    clean_validation: bool = False,
) -> tuple[list[Example], list[Example] | None, dict[str, Any]]:
    """Apply the PII action, deduplicate, check contamination and plant canaries.

    Returns:
        (training examples, validation examples, evidence for the manifest). Validation data gets the
        same PII action (it is shown to the model too) but is never deduplicated or given canaries.
    """
    if dedupe not in DEDUPE_MODES:
        raise ValueError(f"dedupe must be one of {', '.join(DEDUPE_MODES)}, got {dedupe!r}")
    kept, pii_report = scan_examples(train, pii)
    evidence: dict[str, Any] = {"pii": pii_report.to_json()}
    if validation is not None:
        validation, val_pii = scan_examples(validation, pii)
        evidence["validation_pii"] = val_pii.to_json()
    dups = find_duplicates(kept, threshold)
    removed = set()
    if dedupe == "exact":
        removed = {i for g in dups.exact_groups for i in g[1:]}
    elif dedupe == "near":
        removed = dups.duplicates()
    evidence["duplicates"] = {
        "mode": dedupe,
        "threshold": threshold,
        "exact_groups": len(dups.exact_groups),
        "exact_duplicates": sum(len(g) - 1 for g in dups.exact_groups),
        "near_duplicate_pairs": len(dups.near_pairs),
        "removed": len(removed),
        "examples": [
            {"kept": f"{kept[a].file}:{kept[a].line}", "duplicate": f"{kept[b].file}:{kept[b].line}", "similarity": s}
            for a, b, s in dups.near_pairs[:20]
        ],
    }
    kept = [ex for i, ex in enumerate(kept) if i not in removed]
    if validation:
        hits = find_contamination(kept, validation, threshold)
        contaminated = {h.eval_index for h in hits}
        evidence["contamination"] = {
            "threshold": threshold,
            "removed_from_validation": len(contaminated) if clean_validation else 0,
            "validation_examples_in_training": len(hits),
            "examples": [
                {
                    "validation": f"{validation[h.eval_index].file}:{validation[h.eval_index].line}",
                    "training": f"{kept[h.train_index].file}:{kept[h.train_index].line}",
                    "similarity": h.similarity,
                }
                for h in hits[:20]
            ],
        }
        if clean_validation and hits:
            # a split we made ourselves must be held out for real: copies of training examples go
            # (after the evidence above is written: its indices point into the unfiltered list)
            validation = [ex for i, ex in enumerate(validation) if i not in contaminated]
    planted = make_canaries(canaries, canary_repeats, seed)
    if planted:
        kept = kept + canary_examples(planted, "<canaries>")
        random.Random(seed).shuffle(kept)
    # the canaries' secrets are recorded here, for the memorization suite; model cards leave them out
    evidence["canaries"] = [{"prefix": c.prefix, "secret": c.secret, "repeats": c.repeats} for c in planted]
    return kept, validation, evidence
