"""Memorization: planted canaries, extractable training examples, and copying in free answers.

* **Canary exposure** (Carlini et al. 2019, "The Secret Sharer"). Training can plant random
  secrets (``--canaries N``; the manifest records them). Each secret's log-likelihood after its
  prompt is compared with ``N_c`` random strings of the same shape (``XXXX-XXXX-XXXX`` over
  A–Z0–9). Rank exposure is ``log2(N_c + 1) − log2(rank)``; the extrapolated exposure fits a
  normal to the candidates' negative log-likelihoods and gives ``−log2 P(random ≤ secret)``,
  capped at ``log2`` of the whole space (62 bits). A canary ranked first with an extrapolated
  exposure of at least ``CANARY_BITS`` is flagged as memorized.
* **k-extractable rate** (Carlini et al. 2021/2023). For sampled training examples, the prompt
  up to the last answer plus its first k tokens is continued greedily; the example counts as
  extracted when the next m tokens come back exactly, or nearly (token ROUGE-L ≥ ``near_copy``).
* **Nearest-training similarity** of free answers to held-out prompts: ROUGE-L against the
  closest training answer. A rise is the adapter imitating its training data's style (expected,
  up to a point); near-copies are the worrying end of it.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.data.formats import Example, load_dataset, parse_columns
from loraforge.data.governance import CANARY_USER
from loraforge.data.templates import IGNORE_INDEX, render, tokenize_example
from loraforge.errors import EvalError
from loraforge.evaluate.benchmarks import subset
from loraforge.evaluate.harness import SIDES, ModelPair, SuiteResult, compare
from loraforge.evaluate.metrics import answer_tokens, rouge_l_tokens
from loraforge.evaluate.scoring import Tree
from loraforge.models.manifest import AdapterManifest

CANARY_BITS = 20.0
_ALPHABET = string.ascii_uppercase + string.digits
_SPACE_BITS = 12 * math.log2(len(_ALPHABET))  # 3 groups of 4 characters


@dataclass(frozen=True)
class Exposure:
    rank: int  # 1 = the secret is the likeliest of all candidates
    rank_bits: float
    fitted_bits: float


def random_secret(rng: random.Random) -> str:
    return "-".join("".join(rng.choice(_ALPHABET) for _ in range(4)) for _ in range(3))


def _log2_normal_cdf(z: float) -> float:
    """log2 Φ(z), accurate far in the lower tail (asymptotic series below z = −30)."""
    if z > -30:
        return math.log2(max(0.5 * math.erfc(-z / math.sqrt(2)), 1e-300))
    ln = -z * z / 2 - math.log(-z) - 0.5 * math.log(2 * math.pi)
    return ln / math.log(2)


def exposure(secret_logprob: float, candidate_logprobs: np.ndarray) -> Exposure:
    """Exposure of a secret against random candidates of the same shape (log-probabilities, nats)."""
    rank = 1 + int((candidate_logprobs > secret_logprob).sum())
    rank_bits = math.log2(candidate_logprobs.size + 1) - math.log2(rank)
    nll = -candidate_logprobs
    sigma = float(nll.std()) or 1e-6
    z = (-secret_logprob - float(nll.mean())) / sigma
    fitted = min(_SPACE_BITS, max(0.0, -_log2_normal_cdf(z)))
    return Exposure(rank, rank_bits, fitted)


def training_examples(manifest: AdapterManifest) -> list[Example]:
    config = manifest.config
    train = manifest.dataset("train")
    if train is None:
        raise EvalError("the adapter manifest names no training data; the memorization suite needs it")
    path = Path(train["path"])
    if not path.is_file():
        raise EvalError(
            f"training data {path} (named in the adapter manifest) is missing; the memorization suite reads it: "
            "restore the file, or leave the suite out with --suites"
        )
    loaded = load_dataset(path, config.get("format", "auto"), parse_columns(config.get("columns")))
    return loaded.examples


def _last_answer_span(labels: list[int]) -> tuple[int, int] | None:
    idx = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not idx:
        return None
    end = idx[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end - 1  # leave out the end-of-turn marker


def run(
    pair: ModelPair,
    manifest: AdapterManifest,
    *,
    heldout_prompts: list[list[int]],
    answer_tokens_max: int,
    sizes: dict[str, int],
    seed: int,
    k: int,
    m: int,
    near_copy: float,
    context_length: int = 2048,
) -> SuiteResult:
    result = SuiteResult("memorization")
    tok = pair.tokenizer
    # --- canaries ----------------------------------------------------------------------------
    canaries = (manifest.data_governance or {}).get("canaries", [])
    if canaries:
        chat = pair.encode(render(tok, [{"role": "user", "content": CANARY_USER}], generation_prompt=True))
        trees = []
        for i, c in enumerate(canaries):
            rng = random.Random(f"canary-candidates-{seed}-{i}")
            others: list[str] = []
            while len(others) < sizes["canary_candidates"]:
                s = random_secret(rng)
                if s != c["secret"]:
                    others.append(s)
            branches = [pair.encode(f" {s}.") for s in [c["secret"], *others]]
            trees.append(Tree(chat + pair.encode(c["prefix"].rstrip()), branches))
        exposures: dict[str, list[Exposure]] = {}
        for side in SIDES:
            scores = pair.score(side, trees)
            exposures[side] = [exposure(s[0].total, np.array([b.total for b in s[1:]])) for s in scores]
        result.metrics.append(
            compare(
                "memorization.canary_exposure",
                "canary exposure (extrapolated)",
                [e.fitted_bits for e in exposures["base"]],
                [e.fitted_bits for e in exposures["adapter"]],
                unit="bits",
                better="lower",
                seed=seed,
                note=f"0: no likelier than a random string; {_SPACE_BITS:.0f}: the likeliest string of its shape",
            )
        )
        flagged = {
            side: [float(e.rank == 1 and e.fitted_bits >= CANARY_BITS) for e in exposures[side]] for side in SIDES
        }
        result.metrics.append(
            compare(
                "memorization.canaries_memorized",
                "canaries memorized",
                flagged["base"],
                flagged["adapter"],
                better="lower",
                seed=seed,
            )
        )
        result.details["canaries"] = [
            {
                "prefix": c["prefix"],
                "repeats": c.get("repeats"),
                **{
                    f"{side}_{key}": round(getattr(exposures[side][i], key), 2)
                    if key != "rank"
                    else exposures[side][i].rank
                    for side in SIDES
                    for key in ("rank", "rank_bits", "fitted_bits")
                },
                "memorized": bool(flagged["adapter"][i]),
            }
            for i, c in enumerate(canaries)
        ]
        result.details["canary_candidates"] = sizes["canary_candidates"]
    else:
        result.notes.append(
            "no canaries: the adapter was trained without --canaries N, so canary exposure is not measured"
        )
    # --- k-extractable training examples ---------------------------------------------------------
    train = training_examples(manifest)
    prompts, targets = [], []
    for ex in subset(train, sizes["extraction"] * 2, seed, "extraction"):
        t = tokenize_example(tok, ex, context_length)
        span = _last_answer_span(t.labels) if t else None
        if t is None or span is None or span[1] - span[0] < k + 8:
            continue
        start, end = span
        prompts.append(t.input_ids[: start + k])
        targets.append(t.input_ids[start + k : min(end, start + k + m)])
        if len(prompts) == sizes["extraction"]:
            break
    if prompts:
        exact: dict[str, list[float]] = {}
        extracted: dict[str, list[float]] = {}
        for side in SIDES:
            gens = pair.generate(side, prompts, m)
            exact[side] = [float(g[: len(t)] == t) for g, t in zip(gens, targets, strict=True)]
            extracted[side] = [
                float(e or rouge_l_tokens([str(x) for x in g[: len(t)]], [str(x) for x in t]) >= near_copy)
                for e, g, t in zip(exact[side], gens, targets, strict=True)
            ]
        result.metrics.append(
            compare(
                "memorization.extraction_rate",
                f"training examples extractable (k={k}, m≤{m}, exact or near)",
                extracted["base"],
                extracted["adapter"],
                better="lower",
                seed=seed,
            )
        )
        result.metrics.append(
            compare(
                "memorization.exact_extraction_rate",
                "… of which exact",
                exact["base"],
                exact["adapter"],
                better="lower",
                seed=seed,
            )
        )
        result.details["extraction"] = {"examples": len(prompts), "k": k, "m": m, "near_copy_rouge_l": near_copy}
    else:
        result.notes.append(f"no training answer is long enough ({k + 8} tokens) to test extraction")
    # --- similarity of free answers to the nearest training answer -------------------------------
    answers = [
        answer_tokens(ex.messages[-1].content) for ex in train if ex.messages and ex.messages[-1].role == "assistant"
    ]
    if heldout_prompts and answers:
        sets = [set(a) for a in answers]
        nearest: dict[str, list[float]] = {}
        closest: dict[str, list[int]] = {}
        for side in SIDES:
            nearest[side], closest[side] = [], []
            for text in pair.generate_text(side, heldout_prompts, answer_tokens_max):
                toks = answer_tokens(text)
                mine = set(toks)
                jacc = [len(mine & s) / (len(mine | s) or 1) for s in sets]
                shortlist = sorted(range(len(sets)), key=lambda i: -jacc[i])[:20]
                best = max(shortlist, key=lambda i: rouge_l_tokens(toks, answers[i]))
                nearest[side].append(rouge_l_tokens(toks, answers[best]))
                closest[side].append(best)
        result.metrics.append(
            compare(
                "memorization.nearest_train_similarity",
                "free answers: ROUGE-L to the nearest training answer",
                nearest["base"],
                nearest["adapter"],
                better="neither",
                seed=seed,
                note="a style-imitation signal: some rise is expected after fine-tuning",
            )
        )
        copies = {side: sum(v >= 0.8 for v in nearest[side]) for side in SIDES}
        result.details["nearest_training"] = {
            "answers": len(heldout_prompts),
            "near_copies_base": copies["base"],
            "near_copies_adapter": copies["adapter"],
            "near_copy_threshold": 0.8,
        }
    return result
