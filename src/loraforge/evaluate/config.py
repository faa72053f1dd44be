"""Evaluation options: which suites, how many items of each set, where to write. Every default lives here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import ConfigError

SUITES = ("task", "regression", "bias", "truthfulness", "safety", "memorization")

# Items per set in the default run. Chosen so that base + adapter together finish in about
# 10 minutes on 2 CPU cores with SmolLM2-135M (see docs/evaluation.md for the measured time).
DEFAULT_SIZES: dict[str, int] = {
    "task": 60,  # validation examples (all of them when the split is smaller)
    "mmlu": 100,
    "boolq": 100,
    "openbookqa": 100,
    "hellaswag": 50,
    "bbq": 100,
    "crows_pairs": 100,
    "truthfulqa": 100,
    "made_up_entities": 40,
    "harmful": 60,  # HarmBench + Do-Not-Answer, half from each
    "harmless_lookalikes": 40,
    "extraction": 32,  # sampled training examples
    "canary_candidates": 127,  # random strings each canary is ranked against
}


@dataclass(frozen=True)
class TaskChecks:
    """Checks every generated task answer must pass, declared in the gate policy's ``task`` section."""

    answer_regex: str | None = None
    answer_json: bool = False


@dataclass
class EvalConfig:
    """One evaluation of an adapter against its base model."""

    adapter: Path
    """The adapter directory (PEFT files + manifest.json)."""
    suites: tuple[str, ...] = SUITES
    """Suites to run, in this order."""
    policy: Path | None = None
    """Gate policy YAML (default: the shipped ``default.yaml``)."""
    report: Path | None = None
    """Directory for eval.json, eval.html and plots (default: ADAPTER/eval)."""
    data: Path | None = None
    """Task data instead of the validation data the manifest names."""
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    """Items per set; missing keys take :data:`DEFAULT_SIZES`."""
    seed: int = 0
    """Seed of the subsets, random canary candidates and bootstrap."""
    max_new_tokens: int = 40
    """Longest generated answer for the safety and truthfulness probes (refusals come first)."""
    task_max_new_tokens: int = 96
    """Longest generated answer for the task suite."""
    extraction_prefix: int = 8
    """k: answer tokens given to the model before it must continue a training example."""
    extraction_length: int = 24
    """m: tokens it must then reproduce (fewer when the answer is shorter, at least 8)."""
    near_copy: float = 0.9
    """Token ROUGE-L from which a continuation counts as a near-exact reproduction."""
    threads: int | None = None
    """CPU threads for PyTorch (default: PyTorch's choice)."""
    write_manifest: bool = True
    """Record the verdict and report paths in the adapter's manifest.json."""

    def __post_init__(self) -> None:
        self.adapter = Path(self.adapter)
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise ConfigError(
                f"--suites: unknown suite(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUITES)}"
            )
        self.suites = tuple(s for s in SUITES if s in self.suites)
        bad = [k for k in self.sizes if k not in DEFAULT_SIZES]
        if bad:
            raise ConfigError(f"unknown subset size(s) {', '.join(bad)}; known: {', '.join(DEFAULT_SIZES)}")
        self.sizes = {**DEFAULT_SIZES, **self.sizes}
        if any(v < 1 for v in self.sizes.values()):
            raise ConfigError("every subset size must be at least 1")
        if self.extraction_prefix < 1 or self.extraction_length < 8:
            raise ConfigError("extraction_prefix must be >= 1 and extraction_length >= 8")

    @property
    def report_dir(self) -> Path:
        return Path(self.report) if self.report else self.adapter / "eval"


def parse_suites(text: str | None) -> tuple[str, ...]:
    """``"task,safety"`` → ``("task", "safety")``; None or "all" → every suite."""
    if text is None or text.strip() in ("", "all"):
        return SUITES
    return tuple(s.strip() for s in text.split(",") if s.strip())
