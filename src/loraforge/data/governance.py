"""The data-governance actions and flags: personal data and secrets, duplicates, contamination, canaries.

:func:`prepare_training_examples` applies what the user asked for and returns the evidence that goes
into the adapter's ``manifest.json`` (``data_governance``). Secrets (API keys, tokens, private keys)
are never trained on unless the user says so: ``--pii report`` still replaces them with placeholders
unless ``allow_secrets`` is set.

:func:`flags_from_evidence` turns that evidence and the licence record into ``governance_flags``: every
governance exception a run took, listed wherever the adapter is shown
(:meth:`loraforge.models.manifest.AdapterManifest.flags` reads them back from a manifest).
Training applies them through :func:`loraforge.data.prepare.prepare_data`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraforge.data.dedup import find_contamination, find_duplicates
from loraforge.data.formats import Example, Message
from loraforge.data.licensing import DEFAULT_POLICY, load_policy, self_attested, source_label
from loraforge.data.pii import PiiAction
from loraforge.data.scan import ScanReport, scan_examples

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
    allow_secrets: bool = False,
) -> tuple[list[Example], list[Example] | None, dict[str, Any]]:
    """Apply the PII action, deduplicate, check contamination and plant canaries.

    Secrets are redacted whatever ``pii`` says, unless ``allow_secrets``: with ``pii="report"`` they
    become placeholders (``<SECRET_OPENAI_KEY_1>``) while personal data is kept and reported; ``redact``
    and ``drop`` remove them with the rest. ``allow_secrets`` keeps them only under ``report``.

    Returns:
        (training examples, validation examples, evidence for the manifest). Validation data gets the
        same PII and secrets handling (it is shown to the model too) but is never deduplicated or given
        canaries. The evidence's ``secrets`` entry says what happened to the secrets and whether
        ``allow_secrets`` was set.
    """
    if dedupe not in DEDUPE_MODES:
        raise ValueError(f"dedupe must be one of {', '.join(DEDUPE_MODES)}, got {dedupe!r}")
    kept, pii_report = scan_examples(train, pii, redact_secrets=not allow_secrets)
    evidence: dict[str, Any] = {"pii": pii_report.to_json()}
    val_pii: ScanReport | None = None
    if validation is not None:
        validation, val_pii = scan_examples(validation, pii, redact_secrets=not allow_secrets)
        evidence["validation_pii"] = val_pii.to_json()
    evidence["secrets"] = _secrets_evidence(pii, allow_secrets, pii_report, val_pii)
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


def _secrets_evidence(
    pii: PiiAction, allow_secrets: bool, train: ScanReport, validation: ScanReport | None
) -> dict[str, Any]:
    """What happened to the secrets: ``kept`` (only with allow_secrets and pii report), ``redacted`` or ``dropped``."""
    handled = {"drop": "dropped", "redact": "redacted"}.get(pii, "kept" if allow_secrets else "redacted")
    return {
        "allow_secrets": allow_secrets,
        "handling": handled,
        "found": sum(train.secret_counts.values()),
        "redacted": train.secrets_redacted,
        "examples_dropped": train.examples_with_secrets if handled == "dropped" else 0,
        "validation_found": sum(validation.secret_counts.values()) if validation else 0,
        "validation_redacted": validation.secrets_redacted if validation else 0,
    }


# --- governance flags: every exception a run took, for whoever looks at the adapter ----------------

FLAG_CODES = ("allow_unlicensed", "allow_secrets", "non_default_policy", "self_attested_approval")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def flags_from_evidence(licensing: Mapping[str, Any], data_governance: Mapping[str, Any]) -> list[dict[str, str]]:
    """The governance exceptions of a training run, from its manifest's ``licensing`` and ``data_governance``.

    Codes (in this order, each at most once; see docs/data.md):

    - ``allow_unlicensed``: trained with ``--allow-unlicensed``;
    - ``allow_secrets``: trained with ``--allow-secrets``, or, for a run from before secrets were
      redacted by default, with secrets left in the data under ``--pii report``;
    - ``non_default_policy``: licences judged by another policy than the shipped default;
    - ``self_attested_approval``: a licence review cleared by an approval that names the data's own
      owner or no one (:func:`loraforge.data.licensing.self_attested`).

    Args:
        licensing: the manifest's ``licensing`` record (:attr:`loraforge.data.prepare.PreparedData.licensing`).
        data_governance: the manifest's ``data_governance`` record (:func:`prepare_training_examples`).

    Returns:
        ``[{"flag": code, "detail": one plain sentence}, ...]``, empty when no exception was taken.
    """
    flags: list[dict[str, str]] = []

    def flag(code: str, detail: str) -> None:
        flags.append({"flag": code, "detail": detail})

    if licensing.get("allow_unlicensed"):
        files = list(licensing.get("files_without_manifest") or [])
        uncovered = int(licensing.get("uncovered_records") or 0)
        if files or uncovered:
            flag(
                "allow_unlicensed",
                f"Trained with --allow-unlicensed: {_plural(len(files), 'data file')} without a licence manifest, "
                f"{_plural(uncovered, 'record')} covered by no licence source.",
            )
        else:
            flag("allow_unlicensed", "Trained with --allow-unlicensed, although every record had a licence source.")

    secrets = data_governance.get("secrets")
    pii = data_governance.get("pii") or {}
    found = sum((pii.get("secrets") or {}).values())
    if isinstance(secrets, Mapping) and secrets.get("allow_secrets"):
        handling = secrets.get("handling")
        if handling == "kept" and found:
            what = f"{_plural(found, 'secret')} (API keys, tokens or private keys) in the training data"
            flag("allow_secrets", f"Trained with --allow-secrets: {what}, trained on as found.")
        elif handling == "kept":
            flag("allow_secrets", "Trained with --allow-secrets, although no secret was found in the training data.")
        elif handling == "dropped":
            flag(
                "allow_secrets", "Trained with --allow-secrets, although --pii drop left out the examples with secrets."
            )
        else:
            flag("allow_secrets", "Trained with --allow-secrets, although --pii redact replaced the secrets.")
    elif not isinstance(secrets, Mapping) and pii.get("action") == "report" and found:
        flag(
            "allow_secrets",
            f"Trained before loraforge redacted secrets by default: {_plural(found, 'secret')} in the training data, "
            "trained on as found.",
        )

    policy = licensing.get("policy") or {}
    default = policy.get("default")
    if default is None and policy:  # a manifest from before the record said: compare with today's default
        shipped = load_policy(DEFAULT_POLICY)
        default = policy.get("sha256") == shipped.sha256 or policy.get("name") == shipped.name
    if policy and not default:
        flag(
            "non_default_policy",
            f"Licences were judged by the policy {policy.get('name')!r} ({policy.get('path')}), "
            "not by loraforge's default policy.",
        )

    owners = {
        source_label(s.get("path"), s.get("source")): s
        for s in licensing.get("sources") or []
        if isinstance(s, Mapping)
    }
    self_approved = []
    for d in licensing.get("decisions") or []:
        src = owners.get(d.get("source", "")) if isinstance(d, Mapping) else None
        if src is None or not src.get("approved_by") or d.get("verdict") != "review" or not d.get("cleared_by"):
            continue  # only an approval that cleared a review counts
        if self_attested(str(src["approved_by"]), str(src.get("owner", ""))):
            self_approved.append(f"{d['source']} ({d.get('license')}) by {src['approved_by']!r}")
    if self_approved:
        flag(
            "self_attested_approval",
            f"{_plural(len(self_approved), 'licence review')} cleared by the data's own owner or by no named "
            f"approver, not by an independent one: {'; '.join(self_approved)}.",
        )
    return flags
