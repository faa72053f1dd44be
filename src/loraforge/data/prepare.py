"""Data governance in one place: the data a run trains on, and what ``loraforge data check`` reports.

Both go through the same steps and the same rules: read and validate (formats, templates, token
lengths), scan for personal data and secrets, find near duplicates and contamination, and match every
record to a licence (:meth:`LicenseReport.refuses_training` decides when unlicensed data passes;
:data:`loraforge.data.dedup.NEAR_DUPLICATE_THRESHOLD` is the one near-duplicate default).

- :func:`prepare_data` is training's entry point: it refuses data that cannot be trained on, applies
  the governance options (PII action, secrets, dedupe, canaries, a clean held-out split) and returns
  the tokenized examples with the evidence the adapter manifest records (:class:`PreparedData`).
- :func:`check_data` is ``data check``'s: it changes nothing and adds every finding to the data
  report as a problem (an error where training would be refused, a warning otherwise)
  (:class:`DataCheck`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.data.dedup import NEAR_DUPLICATE_THRESHOLD, find_contamination, find_duplicates
from loraforge.data.formats import Example, Format, Problem, Severity, load_dataset
from loraforge.data.governance import flags_from_evidence, prepare_training_examples
from loraforge.data.licensing import LicenseError, LicenseReport, check_licensing, manifest_path_for
from loraforge.data.pii import PiiAction
from loraforge.data.scan import scan_examples
from loraforge.data.templates import Overlong, TokenizedExample, tokenize_all
from loraforge.data.validate import DEFAULT_MAX_LENGTH, DataReport, check_dataset
from loraforge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PreparedData:
    """What a training run takes from its data, and the evidence its adapter manifest records."""

    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    train_report: DataReport
    validation_report: DataReport | None  # None when validation was held out of the training file
    licensing: dict[str, Any]  # the licence record: LicenseReport.to_json() and allow_unlicensed
    governance: dict[str, Any]  # what the governance options did (``prepare_training_examples``' evidence)
    flags: list[dict[str, str]]  # every governance exception taken (``flags_from_evidence``)


@dataclass
class DataCheck:
    """What ``loraforge data check`` found: every problem is in ``report``."""

    report: DataReport
    licensing: LicenseReport | None  # None when the manifest could not be read (an error in ``report``)
    governance: dict[str, Any]  # the content findings: PII, secrets, duplicates, contamination


# --- training -------------------------------------------------------------------------------------


def prepare_data(
    data: str,
    validation: str | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    format: Format,
    columns: dict[str, str],
    max_length: int,
    overlong: Overlong,
    validation_split: float,
    seed: int,
    pii: PiiAction,
    dedupe: str,
    threshold: float,
    canaries: int,
    canary_repeats: int,
    allow_secrets: bool,
    manifest: str | None,
    policy: str | None,
    allow_unlicensed: bool,
) -> PreparedData:
    """Check the data, split off validation, apply the governance options, tokenize, then the licences.

    Args:
        data: the training file; validation: a validation file, or None to hold out
            ``validation_split`` of the training examples (shuffled with ``seed``).
        format, columns, max_length, overlong: how to read and tokenize (see ``check_dataset``).
        pii, dedupe, threshold, canaries, canary_repeats, allow_secrets: the governance options
            (see :func:`loraforge.data.governance.prepare_training_examples`).
        manifest, policy, allow_unlicensed: the licence check (see :func:`check_licensing`).

    Raises:
        DataError: the data has errors (all listed), or nothing is left to train or validate on.
        LicenseError: the licences refuse training; nothing has been written yet.
    """

    def check(path: str) -> DataReport:
        return check_dataset(path, tokenizer, format=format, columns=columns, max_length=max_length, overlong=overlong)

    report = check(data)
    if not report.ok:
        raise DataError(f"{data} cannot be trained on; fix these first:\n{_data_problems(report)}")
    vreport = None
    if validation:
        vreport = check(validation)
        vreport.problems = [p for p in vreport.problems if p.code != "too_few_examples"]
        if not vreport.ok or not vreport.tokenized:
            raise DataError(f"{validation} cannot be used for validation:\n{_data_problems(vreport)}")
        train_ex, val_ex = list(report.examples), list(vreport.examples)
    else:
        train_ex, val_ex = _hold_out(report.examples, validation_split, seed)
        if not train_ex:
            raise DataError(f"{data}: no example left for training after holding out the validation split")
    train_ex, val_kept, evidence = prepare_training_examples(
        train_ex,
        val_ex,
        pii=pii,
        dedupe=dedupe,
        threshold=threshold,
        canaries=canaries,
        canary_repeats=canary_repeats,
        seed=seed,
        clean_validation=not validation,
        allow_secrets=allow_secrets,
    )
    if not val_kept:
        raise DataError("no validation example is left after the PII action; use --pii redact instead of drop")
    train_tok, _, _ = tokenize_all(tokenizer, train_ex, max_length, overlong)
    val_tok, _, _ = tokenize_all(tokenizer, val_kept, max_length, overlong)

    datasets = [(Path(data), report.examples)]
    if vreport is not None and validation:
        datasets.append((Path(validation), vreport.examples))
    licensing = _training_licences(datasets, data, manifest=manifest, policy=policy, allow_unlicensed=allow_unlicensed)
    return PreparedData(
        train_tok, val_tok, report, vreport, licensing, evidence, flags_from_evidence(licensing, evidence)
    )


def _data_problems(report: DataReport, limit: int = 20) -> str:
    lines = [str(p) for p in report.errors[:limit]]
    more = len(report.errors) - limit
    return "\n".join(lines + ([f"... and {more} more"] if more > 0 else []))


def _hold_out(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, validation): ``share`` of ``examples`` (at least one), picked by a shuffle with ``seed``."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(order) * share))])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def _training_licences(
    datasets: list[tuple[Path, list[Example]]],
    data: str,
    *,
    manifest: str | None,
    policy: str | None,
    allow_unlicensed: bool,
) -> dict[str, Any]:
    """Apply the licence manifest and policy; raise before anything is written if training is refused.

    ``allow_unlicensed`` lets data without a manifest (or records no source covers) through, and is
    recorded; a denied licence or an uncleared review always stops.
    """
    report = check_licensing(datasets, manifest=manifest, policy=policy)
    if report.refuses_training(allow_unlicensed):
        problems = "\n".join(f"- {p}" for p in report.problems())
        hint = (
            f"\nwrite a manifest ({manifest_path_for(data).name}, see docs/data.md) or pass --allow-unlicensed"
            if report.missing or report.uncovered
            else ""
        )
        raise LicenseError(f"training refused by the licence check:\n{problems}{hint}")
    return {**report.to_json(), "allow_unlicensed": allow_unlicensed}


# --- data check -----------------------------------------------------------------------------------


def check_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    format: Format = "auto",
    columns: dict[str, str] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    overlong: Overlong = "truncate",
    manifest: str | Path | None = None,
    policy: str | Path | None = None,
    allow_unlicensed: bool = False,
    against: Path | None = None,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
) -> DataCheck:
    """Every problem of a dataset: structure and token lengths (``check_dataset``), then
    :func:`check_governance`. ``check.report.ok`` is False when the data cannot be trained on.

    Raises:
        ConfigError: ``threshold`` is not in (0, 1].
        DataError: ``against`` cannot be read.
    """
    report = check_dataset(path, tokenizer, format=format, columns=columns, max_length=max_length, overlong=overlong)
    licensing, governance = check_governance(
        report,
        manifest=manifest,
        policy=policy,
        allow_unlicensed=allow_unlicensed,
        against=against,
        threshold=threshold,
    )
    return DataCheck(report, licensing, governance)


def check_governance(
    report: DataReport,
    *,
    manifest: str | Path | None = None,
    policy: str | Path | None = None,
    allow_unlicensed: bool = False,
    against: Path | None = None,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
) -> tuple[LicenseReport | None, dict[str, Any]]:
    """Licences, PII, secrets, near duplicates and (with ``against``) contamination of a checked dataset.

    Findings are added to ``report`` as problems: licence problems are errors where training would be
    refused (:meth:`LicenseReport.refuses_training`), warnings otherwise; content findings are warnings.

    Returns:
        The licence report (None when the manifest could not be read; that is an error in ``report``)
        and the content findings.
    """
    path = Path(report.path)
    licensing = None
    if report.examples:
        try:
            licensing = check_licensing([(path, report.examples)], manifest=manifest, policy=policy)
        except LicenseError as e:
            report.problems.insert(0, Problem(str(manifest or path), 0, "licence", "invalid_manifest", str(e)))
        else:
            severity: Severity = "error" if licensing.refuses_training(allow_unlicensed) else "warning"
            for message in licensing.problems():
                report.problems.insert(0, Problem(str(path), 0, "licence", "licence_policy", message, severity))
    return licensing, _content_findings(report, licensing, against, threshold)


def _content_findings(
    report: DataReport,
    licensing: LicenseReport | None,
    against: Path | None,
    threshold: float,
) -> dict[str, Any]:
    """PII, secrets, near duplicates and contamination of a checked dataset; adds warnings to ``report``."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"--threshold must be in (0, 1], got {threshold}")
    examples = report.examples
    _, scan = scan_examples(examples, "report")
    file = report.path
    for kind, count in sorted({**scan.pii_counts, **scan.secret_counts}.items()):
        secret = kind.startswith("SECRET")
        what = "possible secret" if secret else "personal data"
        unverified = scan.unverified_counts.get(kind, 0)
        # the same findings `data redact` and `train --pii redact` replace, those found by label included
        labelled = f" ({unverified} fail the {kind} check but are named by a label)" if unverified else ""
        hint = (
            "`loraforge train` redacts secrets unless --allow-secrets is given"
            if secret
            else "use `loraforge data redact` or train with --pii redact"
        )
        report.problems.append(
            Problem(
                file,
                0,
                "content",
                "secret" if secret else "pii",
                f"{count} {what} finding(s) of type {kind}{labelled}, e.g. {scan.samples[kind][0]}; {hint}",
                "warning",
            )
        )
    if licensing and licensing.manifest and scan.examples_with_pii:
        declared = [s.label for s in licensing.sources if not s.personal_data]
        if declared:
            report.problems.append(
                Problem(
                    file,
                    0,
                    "licence",
                    "personal_data_mismatch",
                    f"the manifest says {', '.join(declared)} hold no personal data, but "
                    f"{scan.examples_with_pii} example(s) have personal-data findings",
                    "warning",
                )
            )
    dups = find_duplicates(examples, threshold)
    for a, b, sim in dups.near_pairs:
        report.problems.append(
            Problem(
                file,
                examples[b].line,
                "record",
                "near_duplicate",
                f"near duplicate of line {examples[a].line} (similarity {sim:.2f})",
                "warning",
            )
        )
    result: dict[str, Any] = {
        "pii": scan.to_json(),
        "exact_duplicate_groups": len(dups.exact_groups),
        "near_duplicate_pairs": len(dups.near_pairs),
        "threshold": threshold,
    }
    if against is not None:
        other = load_dataset(against)  # its own format: --format and --columns describe the training file
        if other.errors or not other.examples:
            first = str(other.errors[0]) if other.errors else "no example"
            raise DataError(f"--against {against} cannot be read: {first}")
        hits = find_contamination(examples, other.examples, threshold)
        for h in hits:
            report.problems.append(
                Problem(
                    str(against),
                    other.examples[h.eval_index].line,
                    "record",
                    "contamination",
                    f"overlaps training line {examples[h.train_index].line} (similarity {h.similarity:.2f})",
                    "warning",
                )
            )
        result["contamination"] = {"against": str(against), "overlapping": len(hits), "of": len(other.examples)}
    report.problems.sort(key=lambda p: (p.severity != "error", p.line))
    return result
