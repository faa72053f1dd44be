"""``loraforge data report``: a datasheet (JSON + HTML) in the sections of "Datasheets for Datasets"
(Gebru et al.): motivation, composition, collection, preprocessing, uses, distribution, maintenance.

What can be measured or read from the licence manifest is filled in and says where it came from;
everything else is marked, visibly, as for the dataset's owner to fill.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraforge.data.dedup import NEAR_DUPLICATE_THRESHOLD, find_duplicates
from loraforge.data.formats import Example
from loraforge.data.licensing import LicenseReport
from loraforge.data.scan import ScanReport
from loraforge.data.validate import DataReport
from loraforge.files import write_text_atomic
from loraforge.reportfilters import pretty

TODO = "for the owner to fill"
# A few very frequent function words per language: enough to tell the language of a support message.
_STOPWORDS = {
    "en": "the and to of a is in you for it that on your with are be this can",
    "de": "der die das und ist nicht ich sie mit ein eine zu den für auf ihr",
    "fr": "le la les et est de des un une pour vous que pas en du dans avec",
    "es": "el la los las y es de que en un una por para con no se su",
    "it": "il la di che e un una per non sono con del della le gli",
    "pt": "o a os as e de que em um uma para com não do da se",
    "nl": "de het een en is van dat niet ik je op te met voor zijn",
}
_STOP = {lang: set(words.split()) for lang, words in _STOPWORDS.items()}
_WORD = re.compile(r"[a-zà-ÿ]+")


def guess_language(text: str) -> str:
    """The language whose function words are most frequent in ``text`` ("und" when too short)."""
    words = _WORD.findall(text.lower())
    scores = {lang: sum(w in stop for w in words) for lang, stop in _STOP.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] >= 2 else "und"


def _field(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def _todo(question: str) -> dict[str, Any]:
    return {"value": None, "source": TODO, "question": question}


def build_datasheet(
    report: DataReport, licensing: LicenseReport | None, scan: ScanReport, threshold: float = NEAR_DUPLICATE_THRESHOLD
) -> dict[str, Any]:
    """The datasheet as a JSON-able dict; each entry is ``{"value", "source"}`` or a question to answer."""
    examples: list[Example] = report.examples
    summary = report.summary()
    langs = Counter(guess_language(" ".join(m.content for m in ex.messages)) for ex in examples)
    dups = find_duplicates(examples, threshold)
    sources = licensing.sources if licensing else []
    owners = sorted({s.owner for s in sources})
    licences = sorted({s.license for s in sources})
    personal = [s.label for s in sources if s.personal_data]
    manifest_src = f"licence manifest {licensing.manifest.path.name}" if licensing and licensing.manifest else None

    def from_manifest(value: Any, question: str) -> dict[str, Any]:
        return _field(value, manifest_src) if manifest_src and value else _todo(question)

    return {
        "title": f"Datasheet: {Path(report.path).name}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {"path": str(report.path), "format": report.format},
        "sections": {
            "motivation": {
                "purpose": _todo("For what purpose was the dataset created? What task should a model learn from it?"),
                "creators": from_manifest(", ".join(owners), "Who created the dataset, and on behalf of whom?"),
                "funding": _todo("Who funded the creation of the dataset?"),
            },
            "composition": {
                "instances": _field(
                    f"{summary['examples']} conversations ({summary['usable_examples']} usable for training)",
                    "measured",
                ),
                "messages": _field(summary["messages"], "measured"),
                "tokens": _field(
                    {k: summary[k] for k in ("tokens", "trained_tokens", "min_tokens", "mean_tokens", "max_tokens")},
                    "measured with the base model's tokenizer",
                )
                if report.tokenized
                else _todo("Token statistics need the base model; run with it installed."),
                "length_histogram": _field(summary["histogram"], "measured"),
                "languages": _field(dict(langs.most_common()), "measured (function-word heuristic)"),
                "personal_data": _field(
                    {
                        "declared_by_sources": personal,
                        "findings": scan.to_json()["pii"],
                        "examples_with_findings": scan.examples_with_pii,
                    },
                    "measured; declaration from the manifest" if manifest_src else "measured",
                ),
                "secrets": _field(scan.to_json()["secrets"], "measured"),
                "duplicates": _field(
                    {
                        "exact_groups": len(dups.exact_groups),
                        "near_duplicate_pairs": len(dups.near_pairs),
                        "threshold": threshold,
                    },
                    "measured",
                ),
                "labels": _field("assistant turns are the training targets (weight 0 turns excepted)", "format"),
                "sensitive_content": _todo("Does the data contain offensive, insulting or sensitive content?"),
            },
            "collection": {
                "sources": from_manifest([s.label for s in sources], "Where does each part of the data come from?"),
                "consent_and_terms": from_manifest(
                    {s.label: s.terms for s in sources if s.terms}, "Under which terms or consent was it collected?"
                ),
                "process": _todo("How was the data collected, by whom, and over what time frame?"),
            },
            "preprocessing": {
                "validation": _field(f"{summary['errors']} error(s), {summary['warnings']} warning(s)", "measured"),
                "over_context": _field({"truncated": summary["truncated"], "dropped": summary["dropped"]}, "measured"),
                "cleaning": _todo("Was any cleaning, redaction or filtering done before this file?"),
            },
            "uses": {
                "intended": _todo("What tasks should the dataset (and models trained on it) be used for?"),
                "out_of_scope": _todo("What uses should be avoided?"),
            },
            "distribution": {
                "licences": from_manifest(licences, "Under which licence(s) may the data be used?"),
                "policy_decisions": _field(
                    [
                        {"source": d.source, "licence": d.license, "decision": d.verdict, "rule": d.rule}
                        for d in licensing.decisions
                    ],
                    f"policy {licensing.policy.name}",
                )
                if licensing and licensing.manifest
                else _todo("Write a licence manifest so that the policy can decide."),
            },
            "maintenance": {
                "maintainer": from_manifest(
                    ", ".join(owners), "Who maintains the dataset and how can they be reached?"
                ),
                "updates": _todo("Will the dataset be updated? How often, and by whom?"),
            },
        },
    }


ASSETS = Path(__file__).parent / "assets"


def _histogram_png(histogram: list[list[int]] | list[tuple[int, int, int]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=100)
    labels = [f"{lo}-{hi}" for lo, hi, _ in histogram]
    ax.bar(labels, [c for _, _, c in histogram], color="#3b6ea8")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_html(sheet: dict[str, Any]) -> str:
    from jinja2 import Environment

    env = Environment(autoescape=True)
    env.filters["pretty"] = pretty
    comp = sheet["sections"]["composition"]
    hist = comp["length_histogram"]["value"]
    todo = sum(1 for sec in sheet["sections"].values() for f in sec.values() if f["source"] == TODO)
    template = env.from_string((ASSETS / "datasheet.html.j2").read_text(encoding="utf-8"))
    return template.render(
        s=sheet,
        css=(ASSETS / "report.css").read_text(encoding="utf-8"),
        comp=comp,
        todo=todo,
        todo_label=TODO,
        hist_png=_histogram_png(hist) if hist else "",
    )


def write_datasheet(sheet: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``datasheet.json`` and ``datasheet.html`` into ``out`` (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "datasheet.json", json.dumps(sheet, indent=2, ensure_ascii=False))
    write_text_atomic(out / "datasheet.html", render_html(sheet))
    return out / "datasheet.json", out / "datasheet.html"
