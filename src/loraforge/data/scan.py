"""One pass over a dataset for personal data and secrets, with the action a user asked for.

``report`` leaves the data as it is (or, with ``redact_secrets``, replaces only the secrets);
``redact`` replaces every finding with a typed placeholder (``<EMAIL_1>``, consistent within an
example); ``drop`` leaves out every example with a finding. Reports carry counts per type and a few
masked samples with ``file:line`` (never the raw values). ``loraforge data check`` and the redaction
read the same findings (:func:`scan_text`), so a check reports exactly what a redaction replaces.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loraforge.data.formats import Example
from loraforge.data.pii import Finding, PiiAction, Redactor, find_pii
from loraforge.data.secrets_scan import find_secrets

SAMPLES_PER_TYPE = 5


@dataclass
class ScanReport:
    action: str
    examples: int = 0
    examples_with_pii: int = 0
    examples_with_secrets: int = 0
    pii_counts: Counter[str] = field(default_factory=Counter)
    secret_counts: Counter[str] = field(default_factory=Counter)
    # findings that fail their type's validity check and were found by the label before them
    unverified_counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)  # type → ["file:line: masked value"]
    dropped: int = 0
    redacted: int = 0  # examples in which something was replaced
    secrets_redacted: int = 0  # secret values replaced (each occurrence)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "examples": self.examples,
            "examples_with_pii": self.examples_with_pii,
            "examples_with_secrets": self.examples_with_secrets,
            "pii": dict(sorted(self.pii_counts.items())),
            "secrets": dict(sorted(self.secret_counts.items())),
            "unverified": dict(sorted(self.unverified_counts.items())),
            "samples": self.samples,
            "dropped": self.dropped,
            "redacted": self.redacted,
            "secrets_redacted": self.secrets_redacted,
        }


def scan_text(text: str) -> list[Finding]:
    """Personal data and secrets in one text, without overlaps (secrets win)."""
    secrets = find_secrets(text)
    pii = [f for f in find_pii(text) if not any(f.start < s.end and s.start < f.end for s in secrets)]
    return sorted(secrets + pii, key=lambda f: f.start)


def scan_examples(
    examples: list[Example], action: PiiAction = "report", *, redact_secrets: bool = False
) -> tuple[list[Example], ScanReport]:
    """Scan every message of every example and apply ``action``.

    Args:
        examples: the examples to scan.
        action: ``report`` (keep the text), ``redact`` (placeholders for every finding) or ``drop``
            (leave out every example with a finding).
        redact_secrets: with ``report``, still replace the secrets (never the personal data) with
            placeholders, ``<SECRET_OPENAI_KEY_1>``; ``redact`` and ``drop`` handle secrets anyway.

    Returns:
        The examples to keep (redacted where asked) and the report.
    """
    if action not in ("report", "redact", "drop"):
        raise ValueError(f"PII action must be report, redact or drop, got {action!r}")
    report = ScanReport(action=action, examples=len(examples))
    kept: list[Example] = []
    for ex in examples:
        per_message = [scan_text(m.content) for m in ex.messages]
        findings = [f for fs in per_message for f in fs]
        if not findings:
            kept.append(ex)
            continue
        has_secret = any(f.type.startswith("SECRET") for f in findings)
        report.examples_with_secrets += has_secret
        report.examples_with_pii += any(not f.type.startswith("SECRET") for f in findings)
        for f in findings:
            counts = report.secret_counts if f.type.startswith("SECRET") else report.pii_counts
            counts[f.type] += 1
            if f.valid is False:
                report.unverified_counts[f.type] += 1
            samples = report.samples.setdefault(f.type, [])
            if len(samples) < SAMPLES_PER_TYPE:
                note = " (fails its check; named by a label)" if f.valid is False else ""
                samples.append(f"{ex.file}:{ex.line}: {f.masked()}{note}")
        if action == "drop":
            report.dropped += 1
            continue
        if action == "report" and not (redact_secrets and has_secret):
            kept.append(ex)
            continue
        if action == "report":  # only the secrets go
            per_message = [[f for f in fs if f.type.startswith("SECRET")] for fs in per_message]
        redactor = Redactor(" ".join(m.content for m in ex.messages))
        messages = tuple(
            dataclasses.replace(m, content=redactor.redact(m.content, fs)) if fs else m
            for m, fs in zip(ex.messages, per_message, strict=True)
        )
        kept.append(dataclasses.replace(ex, messages=messages))
        report.redacted += 1
        report.secrets_redacted += sum(f.type.startswith("SECRET") for fs in per_message for f in fs)
    return kept, report


def example_to_chat(example: Example) -> dict[str, Any]:
    """An example as an OpenAI chat record (weights kept, the source tag too)."""
    messages: list[dict[str, Any]] = []
    for m in example.messages:
        record: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.weight == 0:
            record["weight"] = 0
        messages.append(record)
    out: dict[str, Any] = {"messages": messages}
    if example.source:
        out["source"] = example.source
    return out


__all__ = ["ScanReport", "example_to_chat", "scan_examples", "scan_text"]
