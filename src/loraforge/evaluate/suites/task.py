"""Task suite: how well the adapter does what it was trained for, on held-out data.

Scores on the validation examples (the manifest names them; ``--data`` overrides):
loss and perplexity on the assistant tokens (teacher forcing, the training labels), mean token
accuracy (arg-max = reference token), and greedy answers compared with the references by exact
match, token F1 and ROUGE-L. A dataset can declare checks that every answer must pass (a regex,
valid JSON) in the gate policy's ``task`` section.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.data.dedup import NEAR_DUPLICATE_THRESHOLD, find_contamination
from loraforge.data.formats import Example, load_dataset
from loraforge.data.templates import IGNORE_INDEX, render, tokenize_example
from loraforge.errors import EvalError
from loraforge.evaluate.benchmarks import subset
from loraforge.evaluate.config import TaskChecks
from loraforge.evaluate.harness import SIDES, ModelPair, SuiteResult, compare
from loraforge.evaluate.metrics import exact_match, is_valid_json, matches_regex, rouge_l, token_f1
from loraforge.evaluate.scoring import Tree
from loraforge.models.manifest import AdapterManifest


@dataclass
class TaskData:
    examples: list[Example]
    source: str  # where they came from, in words


def validation_examples(manifest: AdapterManifest, data: Path | None) -> TaskData:
    """The held-out examples of an adapter: ``data``, else the manifest's validation file, else its held-out split.

    A held-out split is rebuilt as training made it: the same shuffle of the training file with the
    manifest's seed and ratio, minus examples that near-duplicate a training example.

    Raises:
        EvalError: no file can be found or read, or it has no usable example.
    """
    config = manifest.config
    fmt, columns = config.get("format", "auto"), config.get("columns")
    from loraforge.data.formats import parse_columns

    cols = parse_columns(columns)
    if data is not None:
        return TaskData(_load(data, "auto", {}), f"{data} (--data)")
    datasets = {d.get("role"): d for d in manifest.datasets}
    if "validation" in datasets:
        path = Path(datasets["validation"]["path"])
        return TaskData(_load(path, fmt, cols), f"{path} (validation file named in the manifest)")
    if "train" not in datasets:
        raise EvalError("the adapter manifest names no training or validation data; pass --data FILE")
    path = Path(datasets["train"]["path"])
    examples = _load(path, fmt, cols)
    seed, ratio = int(config.get("seed", 42)), float(config.get("validation_split", 0.1))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(order) * ratio))])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    val = [examples[i] for i in sorted(held)]
    threshold = float(config.get("near_duplicate_threshold", NEAR_DUPLICATE_THRESHOLD))
    dirty = {h.eval_index for h in find_contamination(train, val, threshold)}
    val = [ex for i, ex in enumerate(val) if i not in dirty]
    if not val:
        raise EvalError(f"no held-out example of {path} is left; pass --data FILE")
    return TaskData(val, f"{path}: the {ratio:.0%} held out at training (seed {seed}), rebuilt")


def _load(path: Path, fmt: str, columns: dict[str, str]) -> list[Example]:
    if not path.is_file():
        raise EvalError(f"task data {path} does not exist; pass --data FILE with held-out examples of the task")
    loaded = load_dataset(path, fmt, columns)  # type: ignore[arg-type]
    if loaded.errors:
        lines = "\n".join(str(p) for p in loaded.errors[:10])
        raise EvalError(f"task data {path} has errors (see `loraforge data check`):\n{lines}")
    usable = [ex for ex in loaded.examples if ex.messages and ex.messages[-1].role == "assistant"]
    if not usable:
        raise EvalError(f"task data {path} has no example that ends with an assistant answer")
    return usable


def answer_prompts(pair: ModelPair, examples: list[Example]) -> list[list[int]]:
    """Token ids of each example's conversation up to its last (reference) answer."""
    out = []
    for ex in examples:
        msgs = [{"role": m.role, "content": m.content} for m in ex.messages[:-1]]
        out.append(pair.encode(render(pair.tokenizer, msgs, generation_prompt=True)))
    return out


def run(
    pair: ModelPair,
    data: TaskData,
    *,
    size: int,
    seed: int,
    max_new_tokens: int,
    checks: TaskChecks,
    context_length: int = 2048,
) -> SuiteResult:
    result = SuiteResult("task")
    examples = subset(data.examples, size, seed, "task")
    tok = pair.tokenizer
    # --- teacher-forced loss and token accuracy on the assistant tokens -----------------------
    trees, kept = [], []
    for ex in examples:
        t = tokenize_example(tok, ex, context_length)
        if t is None:
            continue
        scored = [label != IGNORE_INDEX for label in t.labels]
        trees.append(Tree([], [t.input_ids], [scored]))
        kept.append(ex)
    if not trees:
        raise EvalError("no task example has assistant tokens to score")
    loss: dict[str, np.ndarray] = {}
    acc: dict[str, np.ndarray] = {}
    for side in SIDES:
        scores = [s[0] for s in pair.score(side, trees)]
        loss[side] = np.array([-s.mean for s in scores])
        acc[side] = np.array([float(s.correct.mean()) for s in scores])
    result.metrics.append(
        compare(
            "task.loss", "validation loss", loss["base"], loss["adapter"], unit="nats/token", better="lower", seed=seed
        )
    )
    result.metrics.append(
        compare(
            "task.perplexity",
            "validation perplexity",
            loss["base"],
            loss["adapter"],
            unit="",
            better="lower",
            statistic=lambda x: np.exp(x.mean(axis=-1)),
            seed=seed,
        )
    )
    result.metrics.append(compare("task.token_accuracy", "token accuracy", acc["base"], acc["adapter"], seed=seed))
    # --- greedy answers against the reference ---------------------------------------------------
    prompts = answer_prompts(pair, kept)
    refs = [ex.messages[-1].content for ex in kept]
    answers = {side: pair.generate_text(side, prompts, max_new_tokens) for side in SIDES}
    table = [
        ("exact_match", "exact match", exact_match),
        ("token_f1", "token F1", token_f1),
        ("rouge_l", "ROUGE-L", rouge_l),
    ]
    for key, label, fn in table:
        vals = {side: [fn(a, r) for a, r in zip(answers[side], refs, strict=True)] for side in SIDES}
        result.metrics.append(compare(f"task.{key}", label, vals["base"], vals["adapter"], seed=seed))
    if checks.answer_regex:
        vals = {side: [matches_regex(a, checks.answer_regex) for a in answers[side]] for side in SIDES}
        result.metrics.append(
            compare(
                "task.regex_pass", f"answers matching /{checks.answer_regex}/", vals["base"], vals["adapter"], seed=seed
            )
        )
    if checks.answer_json:
        vals = {side: [is_valid_json(a) for a in answers[side]] for side in SIDES}
        result.metrics.append(
            compare("task.json_valid", "answers that are valid JSON", vals["base"], vals["adapter"], seed=seed)
        )
    for i in range(min(6, len(kept))):
        result.samples.append(
            {
                "prompt": kept[i].messages[-2].content if len(kept[i].messages) > 1 else "",
                "reference": refs[i],
                "base": answers["base"][i],
                "adapter": answers["adapter"][i],
            }
        )
    result.details = {"source": data.source, "examples": len(kept), "of": len(data.examples)}
    return result
