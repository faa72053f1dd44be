"""Everything ``loraforge data check`` looks at beyond structure: licences, personal data and secrets,
near duplicates and contamination. Findings are added to the report as problems (errors where
training would be refused, warnings otherwise) and returned for display and lineage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraforge.data.dedup import find_contamination, find_duplicates
from loraforge.data.formats import Problem, load_dataset
from loraforge.data.licensing import LicenseError, LicenseReport, check_licensing
from loraforge.data.scan import scan_examples
from loraforge.data.validate import DataReport
from loraforge.errors import ConfigError, DataError


def governance_checks(
    report: DataReport,
    *,
    manifest: str | Path | None = None,
    policy: str | Path | None = None,
    allow_unlicensed: bool = False,
    against: Path | None = None,
    threshold: float = 0.8,
) -> tuple[LicenseReport | None, dict[str, Any]]:
    """Licences, PII, secrets, near duplicates and (with ``against``) contamination of a checked dataset.

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
            decisions_block = any(d.blocks_training for d in licensing.decisions)
            for message in licensing.problems():
                lenient = allow_unlicensed and not decisions_block
                report.problems.insert(
                    0, Problem(str(path), 0, "licence", "licence_policy", message, "warning" if lenient else "error")
                )
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
