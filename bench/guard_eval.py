"""The prompt-injection detector on text it never saw, against keyword and rule filters; its latency.

Two sets, both outside training: the held-out families of the labelled examples (whole templates
and sources kept apart by ``loraforge.guard.dataset``), and a check set that no training, tuning or
rule writing looked at (``dataset.external``). On each: precision, recall, balanced accuracy,
recall per kind (direct, indirect, jailbreak) and false positives on hard negatives, for

- a keyword filter (a text containing one of the words people block: "ignore previous",
  "jailbreak", "DAN", "system prompt", ...),
- the detector's rule layer alone,
- the detector (rules + embeddings + classifier, shipped weights) at its own threshold, and at
  other thresholds a policy may set (``OPERATING_POINTS``; they are shown, not chosen here).

Latency: one user message (p50, p99 over 200 requests of 10 to 60 words), a long document (~3,000
characters), and the fifth request of a conversation (its five user messages, the first four seen
before), with and without the embedding cache.

    python bench/guard_eval.py

The last line is one JSON object.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from typing import Any

OPERATING_POINTS = (0.5, 0.7)  # other thresholds a policy may set, shown beside the shipped one
COLUMNS = (("direct", 8), ("indirect", 9), ("jailbreak", 8))
KEYWORDS = (
    "ignore previous",
    "ignore all",
    "disregard",
    "jailbreak",
    "dan",
    "system prompt",
    "developer mode",
    "do anything now",
    "no restrictions",
    "pretend",
)


KEYWORD = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in KEYWORDS) + r")\b", re.IGNORECASE)


def keyword_flag(text: str) -> bool:
    return KEYWORD.search(text) is not None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    from loraforge.guard.dataset import build, external
    from loraforge.guard.injection import InjectionDetector
    from loraforge.guard.normalize import normalise
    from loraforge.guard.rules import match
    from loraforge.guard.training import figures
    from noisy_neighbour import cpu_features  # beside this script

    print(f"CPU: {cpu_features()}", flush=True)
    detector = InjectionDetector()
    sets = {
        "held-out families": [e for e in build() if e.held_out],
        "never-seen check set": external(),
    }
    results: dict[str, Any] = {}
    for name, examples in sets.items():
        texts = [e.text for e in examples]
        verdicts = detector.check_many(texts)
        rows = {
            "keyword filter": figures(examples, [keyword_flag(t) for t in texts]),
            "rules alone": figures(examples, [bool(match(normalise(t).views)) for t in texts]),
            f"detector ({detector.threshold:.2f})": figures(examples, [v.flagged for v in verdicts]),
            **{
                f"  at {t:.2f}": figures(examples, [v.score >= t for v in verdicts])
                for t in OPERATING_POINTS
                if abs(t - detector.threshold) > 1e-6
            },
        }
        print(f"\n{name}: {len(examples)} texts, {sum(e.label for e in examples)} attacks")
        print(f"{'':16}{'bal.acc':>9}{'prec':>7}{'recall':>8}{'direct':>8}{'indirect':>9}{'jailbr.':>8}{'hardFP':>8}")
        for label, fig in rows.items():
            kinds = fig.recall_by_kind
            print(
                f"{label:16}{fig.balanced_accuracy:9.3f}{fig.precision:7.3f}{fig.recall:8.3f}"
                + "".join(
                    f"{kinds.get(k, float('nan')):{w}.3f}"
                    for k, w in (("direct", 8), ("indirect", 9), ("jailbreak", 8))
                )
                + f"{fig.hard_negative_fpr:8.3f}"
            )
        results[name] = {label: fig.as_dict() for label, fig in rows.items()}

    rng = random.Random(0)
    words = " ".join(e.text for e in sets["held-out families"] if e.kind == "benign").split()
    messages = [" ".join(rng.sample(words, rng.randint(10, 60))) for _ in range(200)]
    detector.check(messages[0])  # warm
    single = []
    for message in messages:
        started = time.perf_counter()
        detector.check(message)
        single.append((time.perf_counter() - started) * 1000)
    document = " ".join(rng.sample(words, 500))[:3000]
    long = []
    for _ in range(20):
        started = time.perf_counter()
        detector.check_many([document], scope=f"document-{len(long)}")  # a new scope: no cached piece
        long.append((time.perf_counter() - started) * 1000)
    # a conversation sends its earlier user messages again with every turn: the fifth request
    conversations = [messages[i : i + 5] for i in range(0, 100, 5)]
    turn5: dict[str, list[float]] = {"cache": [], "no cache": []}
    for label, size in (("cache", 4096), ("no cache", 0)):
        scorer = InjectionDetector(detector.model, detector.embedder, cache_size=size)
        for n, conversation in enumerate(conversations):
            for turn in range(1, 6):
                started = time.perf_counter()
                scorer.check_many(conversation[:turn], scope=f"tenant-{n}")
                if turn == 5:
                    turn5[label].append((time.perf_counter() - started) * 1000)
    latency = {
        "conversation_turn5_p50_ms": round(statistics.median(turn5["cache"]), 2),
        "conversation_turn5_no_cache_p50_ms": round(statistics.median(turn5["no cache"]), 2),
        "p50_ms": round(statistics.median(single), 2),
        "p99_ms": round(percentile(single, 0.99), 2),
        "document_3000_chars_p50_ms": round(statistics.median(long), 2),
    }
    print(f"\nlatency, one message of 10-60 words: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
    print(f"latency, a 3,000-character document: p50 {latency['document_3000_chars_p50_ms']} ms")
    print(
        f"latency, the fifth request of a conversation (five user messages): p50 "
        f"{latency['conversation_turn5_p50_ms']} ms with the cache, {latency['conversation_turn5_no_cache_p50_ms']} ms "
        "without"
    )
    shipped = f"detector ({detector.threshold:.2f})"
    held = results["held-out families"][shipped]
    unseen = results["never-seen check set"][shipped]
    summary = {
        "balanced_accuracy": held["balanced_accuracy"],
        "hard_negative_fpr": held["hard_negative_fpr"],
        "never_seen_balanced_accuracy": unseen["balanced_accuracy"],
        "never_seen_hard_negative_fpr": unseen["hard_negative_fpr"],
        **latency,
        "cpu": cpu_features(),
        "sets": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
