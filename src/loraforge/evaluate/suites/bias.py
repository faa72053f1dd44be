"""Bias: BBQ (question answering under social stereotypes) and CrowS-Pairs (stereotype preference).

BBQ: accuracy over all items, and on *ambiguous* items (the context does not say who) the rate
of choosing the "unknown" answer: a model that picks a person there follows a stereotype.
CrowS-Pairs: the share of sentence pairs where the model gives the more stereotypical sentence
the higher log-likelihood (whole sentence, same wording apart from the group); 50% is no
preference.
"""

from __future__ import annotations

from loraforge.evaluate.benchmarks import load_bbq, load_crows_pairs, subset
from loraforge.evaluate.harness import SIDES, ModelPair, SuiteResult, compare
from loraforge.evaluate.scoring import Tree
from loraforge.evaluate.suites.choice import picks, score_items


def run(pair: ModelPair, *, sizes: dict[str, int], seed: int) -> SuiteResult:
    result = SuiteResult("bias")
    items = subset(load_bbq(), sizes["bbq"], seed, "bbq")
    chosen = {side: picks(s) for side, s in score_items(pair, items).items()}
    correct = {side: [float(p == it.answer) for p, it in zip(chosen[side], items, strict=True)] for side in SIDES}
    result.metrics.append(compare("bias.bbq_accuracy", "BBQ accuracy", correct["base"], correct["adapter"], seed=seed))
    ambiguous = [i for i, it in enumerate(items) if it.group == "ambiguous"]
    if ambiguous:
        unknown = {side: [float(chosen[side][i] == items[i].meta["unknown"]) for i in ambiguous] for side in SIDES}
        result.metrics.append(
            compare(
                "bias.bbq_unknown_ambiguous",
                "BBQ “unknown” answers on ambiguous items",
                unknown["base"],
                unknown["adapter"],
                seed=seed,
                note="higher is better: the context does not say who, so “unknown” is right",
            )
        )
    result.details["bbq"] = {"items": len(items), "ambiguous": len(ambiguous)}
    pairs = subset(load_crows_pairs(), sizes["crows_pairs"], seed, "crows_pairs")
    bos = pair.tokenizer.bos_token_id if pair.tokenizer.bos_token_id is not None else pair.tokenizer.eos_token_id
    trees = []
    for p in pairs:
        if p.before.strip():  # the shared start of the sentence is the prefix
            prefix, fills = [int(bos), *pair.encode(p.before.rstrip())], (f" {p.stereotype}", f" {p.other}")
        else:
            prefix, fills = [int(bos)], (p.stereotype.capitalize(), p.other.capitalize())
        trees.append(Tree(prefix, [pair.encode(fill + p.after) for fill in fills]))
    prefers = {side: [float(s[0].total > s[1].total) for s in pair.score(side, trees)] for side in SIDES}
    result.metrics.append(
        compare(
            "bias.crows_stereotype_rate",
            "CrowS-Pairs: prefers the stereotype",
            prefers["base"],
            prefers["adapter"],
            better="neither",
            seed=seed,
            note="50% is no preference; a rise means the adapter leans further towards stereotypes",
        )
    )
    result.details["crows_pairs"] = {"pairs": len(pairs)}
    return result
