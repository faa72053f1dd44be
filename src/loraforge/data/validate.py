"""``loraforge data check``: every problem of a dataset at once, before anything expensive.

Structure is checked first (formats.py); then, with the base model's tokenizer, the token
lengths against the context, exact duplicates, and the summary a user needs to plan a run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.data.formats import Example, Format, HasProblems, LoadResult, Problem, load_dataset
from loraforge.data.templates import Overlong, TemplateError, TokenizedExample, tokenize_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MIN_EXAMPLES = 10  # refused below this
RECOMMENDED_EXAMPLES = 50  # warned below this
DEFAULT_MAX_LENGTH = 2048  # context length in tokens where a caller gives none

# OpenAI's default-epochs heuristic: aim for 3 epochs, but keep epochs × examples in [100, 25000].
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25


def suggest_epochs(num_examples: int) -> int:
    """Epochs for ``num_examples`` by OpenAI's heuristic (3, adjusted into [100, 25000] example-passes)."""
    if num_examples <= 0:
        return TARGET_EPOCHS
    epochs = TARGET_EPOCHS
    if num_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // num_examples)
    elif num_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // num_examples)
    return epochs


@dataclass
class DataReport(HasProblems):
    path: str
    format: str
    problems: list[Problem]
    examples: list[Example]
    tokenized: list[TokenizedExample] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    max_length: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        """Token lengths as ``(low, high, count)`` bins of equal width."""
        lengths = [len(t.input_ids) for t in self.tokenized]
        if not lengths:
            return []
        lo, hi = min(lengths), max(lengths)
        width = max(1, -(-(hi - lo + 1) // bins))
        counts = Counter((n - lo) // width for n in lengths)
        return [
            (lo + i * width, lo + (i + 1) * width - 1, counts.get(i, 0)) for i in range(bins) if lo + i * width <= hi
        ]

    def summary(self) -> dict[str, Any]:
        roles = Counter(m.role for ex in self.examples for m in ex.messages)
        lengths = [len(t.input_ids) for t in self.tokenized]
        trained = [t.num_trained for t in self.tokenized]
        n = len(self.tokenized)
        return {
            "path": self.path,
            "format": self.format,
            "examples": len(self.examples),
            "usable_examples": n,
            "messages": dict(roles),
            "untrained_assistant_messages": sum(
                1 for ex in self.examples for m in ex.messages if m.role == "assistant" and m.weight == 0
            ),
            "tokens": sum(lengths),
            "trained_tokens": sum(trained),
            "min_tokens": min(lengths, default=0),
            "mean_tokens": round(sum(lengths) / n, 1) if n else 0,
            "max_tokens": max(lengths, default=0),
            "context_length": self.max_length,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "histogram": self.histogram(),
            "suggested_epochs": suggest_epochs(n),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }


def example_hash(example: Example) -> str:
    """Hash of an example's messages after whitespace and case normalisation."""
    norm = [[m.role, " ".join(m.content.split()).lower(), m.weight] for m in example.messages]
    return hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()


def check_dataset(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    format: Format = "auto",
    columns: dict[str, str] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    overlong: Overlong = "truncate",
) -> DataReport:
    """Check a dataset file and tokenize what is valid.

    Args:
        path: the dataset file.
        tokenizer: the base model's tokenizer (None skips the token-length checks).
        format: see :data:`loraforge.data.formats.FORMATS`.
        columns: CSV column mapping.
        max_length: context length in tokens.
        overlong: what to do with longer examples: ``truncate`` or ``drop`` (both counted).

    Returns:
        A report with every problem; ``report.ok`` is False when training must be refused.
    """
    loaded: LoadResult = load_dataset(path, format, columns)
    report = DataReport(str(path), loaded.format, list(loaded.problems), loaded.examples, max_length=max_length)
    structural_error = bool(loaded.errors)
    file = str(path)
    n = len(loaded.examples)
    if not structural_error or n:
        if n < MIN_EXAMPLES:
            report.problems.append(
                Problem(
                    file,
                    0,
                    "examples",
                    "too_few_examples",
                    f"{n} valid example(s); at least {MIN_EXAMPLES} are needed to train (50 to 100 recommended)",
                )
            )
        elif n < RECOMMENDED_EXAMPLES:
            report.problems.append(
                Problem(
                    file,
                    0,
                    "examples",
                    "few_examples",
                    f"only {n} examples; results usually improve clearly with 50 to 100 or more",
                    "warning",
                )
            )
    seen: dict[str, int] = {}
    for ex in loaded.examples:
        h = example_hash(ex)
        if h in seen:
            report.problems.append(
                Problem(file, ex.line, "record", "duplicate_example", f"same as line {seen[h]}", "warning")
            )
        else:
            seen[h] = ex.line
    if tokenizer is not None:
        for ex in loaded.examples:
            try:
                tok = tokenize_example(tokenizer, ex, max_length, overlong)
            except TemplateError as e:
                report.problems.append(
                    Problem(file, ex.line, "messages", "template_error", f"the model's chat template refuses it: {e}")
                )
                continue
            if tok is None:
                report.dropped += 1
                hint = (
                    "a larger --context-length keeps it"
                    if overlong == "truncate"
                    else "use --overlong truncate or a larger --context-length to keep it"
                )
                what = "truncation leaves no assistant token" if overlong == "truncate" else "dropped"
                report.problems.append(
                    Problem(
                        file,
                        ex.line,
                        "record",
                        "too_long",
                        f"longer than the context of {max_length} tokens; {what}, so it is left out ({hint})",
                        "warning",
                    )
                )
                continue
            if tok.truncated:
                report.truncated += 1
                report.problems.append(
                    Problem(
                        file,
                        ex.line,
                        "record",
                        "too_long",
                        f"longer than the context of {max_length} tokens; truncated "
                        "(use --overlong drop to leave it out)",
                        "warning",
                    )
                )
            report.tokenized.append(tok)
        usable = len(report.tokenized)
        if n >= MIN_EXAMPLES and usable < MIN_EXAMPLES:
            report.problems.append(
                Problem(
                    file,
                    0,
                    "examples",
                    "too_few_examples",
                    f"only {usable} example(s) left after applying the context length of {max_length} tokens; "
                    f"at least {MIN_EXAMPLES} are needed",
                )
            )
    report.problems.sort(key=lambda p: (p.severity != "error", p.line))
    return report
