"""Data scan throughput: PII, secrets and near-duplicates over many synthetic examples.

loraforge's scan (validated pattern detectors with cheap pre-filters, MinHash + LSH for near
duplicates) against a naive baseline measured in the same run:

- PII: presidio's ``AnalyzerEngine`` (its predefined recognizers, a blank spaCy pipeline since no
  spaCy model can be downloaded here) called once per example, on a sample, extrapolated;
- duplicates: every pair compared (``difflib.SequenceMatcher`` ratio) on a sample, extrapolated
  quadratically.

    python bench/data_scan.py [--examples 100000] [--baseline-sample 500]

presidio is not a loraforge dependency; install it to measure the baseline:
``pip install presidio-analyzer spacy``. Without it the PII baseline is reported as missing.
The blank spaCy pipeline runs no named-entity model, so the baseline does less work than
presidio's default (a generous baseline).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import resource
import time
from typing import Any

from loraforge.data.formats import Example, Message

USERS = [
    "Where is my order {order}? I paid on {date}.",
    "Can I return the {product} I bought last week?",
    "My name is {name} and my email is {email}, please update my account.",
    "Call me back on {phone}, the battery of my {product} is dead.",
    "Please refund to {iban}, the {product} arrived broken.",
    "How much is a monthly rental of the {product}?",
    "I moved to {address}, can you ship the spare parts there?",
    "The app says my key is {secret}, is that normal?",
    "Do you have the {product} in size {size}?",
    "My card {card} was charged twice for order {order}.",
]
ANSWERS = [
    "Thanks for reaching out! Order {order} ships within 3-5 business days.",
    "Yes, returns are accepted within 30 days if the {product} is like new.",
    "Done, your details are updated. Anything else I can help with?",
    "A monthly rental of the {product} is $99 with a $50 deposit.",
    "We are sorry to hear that; a replacement is on its way.",
]
PRODUCTS = ["Volt City", "Volt Trek", "Volt Cargo", "Path Classic", "Path Sprint", "U-lock", "helmet"]
NAMES = ["Maria Garcia", "John Smith", "Priya Sharma", "Jürgen Müller", "Aisha Khan", "Luca Rossi"]


def synthetic(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fill = {
            "order": f"BP-{rng.randint(10000, 99999)}",
            "date": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "product": rng.choice(PRODUCTS),
            "name": rng.choice(NAMES),
            "email": f"user{rng.randint(1, 10**6)}@example.com",
            "phone": f"+44 20 7946 {rng.randint(1000, 9999)}",
            "iban": "DE89 3704 0044 0532 0130 00",
            "address": f"{rng.randint(1, 300)} Harbor Lane",
            "secret": "ghp_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(36)),
            "size": rng.choice("SML"),
            "card": "4111 1111 1111 1111",
        }
        user = rng.choice(USERS).format(**fill)
        answer = rng.choice(ANSWERS).format(**fill)
        out.append(Example((Message("user", user), Message("assistant", answer)), "synthetic.jsonl", i + 1))
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_loraforge(examples: list[Example]) -> dict[str, Any]:
    from loraforge.data.dedup import find_duplicates
    from loraforge.data.scan import scan_examples

    start = time.perf_counter()
    _, report = scan_examples(examples, "report")
    pii_s = time.perf_counter() - start
    start = time.perf_counter()
    dups = find_duplicates(examples, 0.8)
    dup_s = time.perf_counter() - start
    return {
        "pii_seconds": pii_s,
        "dedup_seconds": dup_s,
        "seconds": pii_s + dup_s,
        "findings": sum(report.pii_counts.values()) + sum(report.secret_counts.values()),
        "near_pairs": len(dups.near_pairs),
        "exact_groups": len(dups.exact_groups),
    }


def run_baseline(examples: list[Example], sample: int, total: int) -> dict[str, Any]:
    texts = [" ".join(m.content for m in ex.messages) for ex in examples[:sample]]
    result: dict[str, Any] = {"sample": sample}
    try:
        import spacy
        import tldextract
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import SpacyNlpEngine

        class BlankEngine(SpacyNlpEngine):  # type: ignore[misc]
            def load(self) -> None:
                self.nlp = {"en": spacy.blank("en")}

        # presidio validates e-mail domains with tldextract, which would fetch the public suffix list:
        # use the snapshot shipped inside tldextract instead (no network here)
        tldextract.extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        engine = AnalyzerEngine(nlp_engine=BlankEngine(), supported_languages=["en"])
        start = time.perf_counter()
        for t in texts:
            engine.analyze(text=t, language="en")
        result["pii_seconds"] = (time.perf_counter() - start) * total / sample
    except ImportError as e:
        result["pii_seconds"] = None
        result["pii_missing"] = f"presidio not installed ({e.name}); pip install presidio-analyzer spacy"
    start = time.perf_counter()
    for i in range(len(texts)):
        for j in range(i):
            difflib.SequenceMatcher(None, texts[i], texts[j]).ratio()
    pairs = sample * (sample - 1) / 2
    result["dedup_seconds"] = (time.perf_counter() - start) * (total * (total - 1) / 2) / pairs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--baseline-sample", type=int, default=500)
    args = parser.parse_args()
    examples = synthetic(args.examples)
    ours = run_loraforge(examples)
    ours["peak_rss_gb"] = peak_rss_gb()  # before the baseline loads presidio and spaCy
    base = run_baseline(examples, args.baseline_sample, args.examples)
    n = args.examples
    rows = [
        ("PII + secrets", ours["pii_seconds"], base["pii_seconds"]),
        ("near-duplicates", ours["dedup_seconds"], base["dedup_seconds"]),
    ]
    print(
        f"| stage ({n:,} examples) | loraforge s | loraforge examples/s | naive baseline s (extrapolated) | speedup |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, ours_s, base_s in rows:
        speed = f"{base_s / ours_s:.0f}×" if base_s else "n/a"
        base_txt = f"{base_s:,.0f}" if base_s else base.get("pii_missing", "n/a")
        print(f"| {name} | {ours_s:.1f} | {n / ours_s:,.0f} | {base_txt} | {speed} |")
    print(f"| total | {ours['seconds']:.1f} | {n / ours['seconds']:,.0f} | | |")
    print(f"peak RSS {ours['peak_rss_gb']:.2f} GB; findings {ours['findings']:,}; near pairs {ours['near_pairs']:,}")
    print(json.dumps({"examples": n, "loraforge": ours, "baseline": base}))


if __name__ == "__main__":
    main()
