"""``loraforge eval``: run the suites on base and adapter, judge the gate, write the report and manifest.

One readable function, :func:`evaluate`: load (adapter manifest, policy, models) → suites →
gate → report → manifest. Each suite runs both sides on the same items before the next suite.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from loraforge.evaluate.benchmarks import SOURCES, subset
from loraforge.evaluate.config import EvalConfig
from loraforge.evaluate.gate import Policy, Verdict, judge, load_policy
from loraforge.evaluate.harness import ModelPair, SuiteResult, timed
from loraforge.evaluate.suites import bias, memorization, regression, safety, task, truthfulness
from loraforge.models.generate import load_chat_model
from loraforge.models.manifest import read_manifest
from loraforge.models.sources import load_model

# which sources each suite reads, for the report's licence table
SUITE_SOURCES = {
    "regression": ("mmlu", "boolq", "openbookqa", "hellaswag"),
    "bias": ("bbq", "crows_pairs"),
    "truthfulness": ("truthfulqa", "made_up_entities"),
    "safety": ("harmbench", "donotanswer", "harmless_lookalikes"),
}


@dataclass
class EvalResult:
    report: dict[str, Any]
    verdict: Verdict
    json_path: Path
    html_path: Path


Progress = Callable[[str], None]


def _check_data(config: EvalConfig) -> None:
    """Locate every data file the chosen suites read before loading any model (fail fast, with the fix)."""
    from loraforge.evaluate.benchmarks import source_path

    for suite in config.suites:
        for name in SUITE_SOURCES.get(suite, ()):
            source_path(name, suite)


def evaluate(config: EvalConfig, *, model_cache: Path, progress: Progress | None = None) -> EvalResult:
    """Evaluate ``config.adapter`` against its base model and write ``eval.json`` and ``eval.html``.

    Raises:
        ModelError: the adapter or its base model is missing or does not match.
        EvalError: a suite's data package is missing (the message names the pip command), the
            policy is invalid, or the task data cannot be found.
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    manifest = read_manifest(config.adapter)
    policy: Policy = load_policy(config.policy)
    _check_data(config)
    task_data = (
        task.validation_examples(manifest, config.data) if {"task", "memorization"} & set(config.suites) else None
    )
    if config.threads:
        torch.set_num_threads(config.threads)
    say(f"loading {manifest.base_model.name} with the adapter {config.adapter}")
    chat = load_chat_model(model_cache, adapter=config.adapter)
    base_model: Any = load_model(chat.base)
    base_model.eval()
    pair = ModelPair(base_model, chat.model.merge_and_unload().eval(), chat.tokenizer)
    context = manifest.context_length()
    sizes, seed = config.sizes, config.seed
    suites: list[SuiteResult] = []
    for name in config.suites:
        say(f"suite {name}: base and adapter")
        if name == "task":
            assert task_data is not None
            result = timed(
                lambda data=task_data: task.run(  # type: ignore[misc]
                    pair,
                    data,
                    size=sizes["task"],
                    seed=seed,
                    max_new_tokens=config.task_max_new_tokens,
                    checks=policy.checks,
                    context_length=context,
                )
            )
        elif name == "regression":
            result = timed(lambda: regression.run(pair, sizes=sizes, seed=seed))
        elif name == "bias":
            result = timed(lambda: bias.run(pair, sizes=sizes, seed=seed))
        elif name == "truthfulness":
            result = timed(lambda: truthfulness.run(pair, sizes=sizes, seed=seed, max_new_tokens=config.max_new_tokens))
        elif name == "safety":
            result = timed(lambda: safety.run(pair, sizes=sizes, seed=seed, max_new_tokens=config.max_new_tokens))
        else:
            assert task_data is not None
            heldout = task.answer_prompts(pair, subset(task_data.examples, sizes["task"], seed, "task"))
            result = timed(
                lambda heldout=heldout: memorization.run(  # type: ignore[misc]
                    pair,
                    manifest,
                    heldout_prompts=heldout,
                    answer_tokens_max=config.task_max_new_tokens,
                    sizes=sizes,
                    seed=seed,
                    k=config.extraction_prefix,
                    m=config.extraction_length,
                    near_copy=config.near_copy,
                    context_length=context,
                )
            )
        say(f"suite {name}: done in {result.seconds:.0f} s")
        suites.append(result)
    metrics = {m.id: m for s in suites for m in s.metrics}
    verdict = judge(policy, metrics)
    total = time.perf_counter() - started
    used = sorted({src for s in config.suites for src in SUITE_SOURCES.get(s, ())})
    report: dict[str, Any] = {
        "kind": "loraforge.evaluation",
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "adapter": {"name": config.adapter.resolve().name, "path": str(config.adapter.resolve())},
        "base_model": manifest.base_model.model_dump(mode="json", exclude_unset=True),
        # governance exceptions of the training run (unlicensed data, kept secrets…), shown at the top
        "governance_flags": manifest.flags(),
        "gate": verdict.to_json(),
        "policy": {"name": policy.name, "path": policy.path},
        "suites": [s.to_json() for s in suites],
        "sizes": sizes,
        "seed": seed,
        "sources": [SOURCES[n].to_json() for n in used],
        "timing": {"total_seconds": round(total, 1), **{s.name: round(s.seconds, 1) for s in suites}},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }
    from loraforge.evaluate.report import write_report

    json_path, html_path = write_report(report, config.report_dir)
    if config.write_manifest:
        record_in_manifest(config.adapter, report, json_path, html_path)
    return EvalResult(report, verdict, json_path, html_path)


def record_in_manifest(adapter: Path, report: dict[str, Any], json_path: Path, html_path: Path) -> None:
    """Add the verdict and links to the report to ``manifest.json`` (re-read, then replaced atomically)."""
    manifest = read_manifest(adapter)
    manifest.evaluation = {
        "created": report["created"],
        "verdict": report["gate"]["verdict"],
        "passed": report["gate"]["passed"],
        "failures": report["gate"]["failures"],
        "inconclusive": report["gate"]["inconclusive"],
        "policy": report["policy"],
        "suites": [s["name"] for s in report["suites"]],
        "headline": {
            m["id"]: {"base": m["base"]["value"], "adapter": m["adapter"]["value"], "delta": m["delta"]["value"]}
            for s in report["suites"]
            for m in s["metrics"]
        },
        "report": {"json": str(json_path.resolve()), "html": str(html_path.resolve())},
    }
    manifest.write(adapter)
