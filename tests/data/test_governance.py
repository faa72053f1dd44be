"""Duplicates, contamination, canaries, and the governance evidence a training run records."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.data.dedup import find_contamination, find_duplicates
from loraforge.data.formats import Example, Message
from loraforge.data.governance import make_canaries, prepare_training_examples
from tests.conftest import chat


def _ex(user: str, assistant: str, line: int) -> Example:
    return Example((Message("user", user), Message("assistant", assistant)), "d.jsonl", line)


BASE = [
    (
        "How long does shipping take to Brackenford?",
        "Standard shipping takes three to five business days and is free on bikes.",
    ),
    (
        "Can I return an e-bike I rode twice?",
        "Yes, within 30 days if it is like new and has under 50 miles on the display.",
    ),
    (
        "What does the battery warranty cover?",
        "One year or 500 cycles; a battery below 70 percent capacity counts as a defect.",
    ),
    (
        "Do you rent cargo bikes by the month?",
        "Yes, the Volt Cargo rents for 199 dollars a month with a 150 dollar deposit.",
    ),
]


def test_exact_and_near_duplicates() -> None:
    examples = [_ex(u, a, i + 1) for i, (u, a) in enumerate(BASE)]
    examples.append(_ex(BASE[0][0].upper(), BASE[0][1] + "  ", 5))  # exact after normalisation
    examples.append(_ex("How long does shipping take to Brackenford??", BASE[0][1].replace("three", "3"), 6))  # near
    report = find_duplicates(examples, threshold=0.6)
    assert report.exact_groups == [[0, 4]]
    assert [(a, b) for a, b, _ in report.near_pairs] == [(0, 5)]
    assert report.duplicates() == {4, 5}


def test_contamination_found_for_a_light_edit() -> None:
    train = [_ex(u, a, i + 1) for i, (u, a) in enumerate(BASE)]
    evaluation = [
        _ex(
            "Can I return an e-bike I rode twice?",
            "Yes, within 30 days if it is like new and has under 50 miles on it.",
            1,
        ),
        _ex("Which colours does the Path Classic come in?", "Graphite, sage and sand.", 2),
    ]
    hits = find_contamination(train, evaluation, threshold=0.7)
    assert [(h.eval_index, h.train_index) for h in hits] == [(0, 1)]
    assert 0.7 <= hits[0].similarity < 1.0


def test_prepare_applies_redaction_dedupe_and_canaries() -> None:
    train = [_ex(u, a, i + 1) for i, (u, a) in enumerate(BASE)]
    train.append(_ex(BASE[1][0], BASE[1][1], 5))
    train.append(_ex("I'm Maria Garcia, mail maria@example.com", "Thanks, noted.", 6))
    val = [_ex("Email me at bob@example.org", "Will do.", 1)]
    kept, val_kept, evidence = prepare_training_examples(
        train, val, pii="redact", dedupe="exact", threshold=0.8, canaries=2, canary_repeats=3, seed=1
    )
    assert evidence["duplicates"]["removed"] == 1
    assert evidence["pii"]["pii"] == {"EMAIL": 1, "PERSON": 1} and evidence["pii"]["redacted"] == 1
    assert val_kept is not None and val_kept[0].messages[0].content == "Email me at <EMAIL_1>"
    canaries = evidence["canaries"]
    assert len(canaries) == 2 and all(c["repeats"] == 3 for c in canaries)
    texts = [m.content for ex in kept for m in ex.messages]
    assert sum(canaries[0]["secret"] in t for t in texts) == 3
    assert len(kept) == 5 + 6
    assert make_canaries(2, 3, 1) == make_canaries(2, 3, 1)  # recorded secrets are reproducible


def test_training_records_governance_evidence(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from loraforge.train import TrainConfig, train

    records = [chat(f"Question number {i} about bikes", f"Answer {i}: see the policy page.") for i in range(14)]
    records.append(chat("Contact me: jane.doe@example.com", "Thanks Jane, we will reply soon."))
    data = write_jsonl(records)
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "out"),
        base_model=str(tiny_model_dir),
        max_steps=1,
        seq_len=256,
        eval_every=0,
        checkpoint_every=0,
        allow_unlicensed=True,
        pii="redact",
        canaries=1,
        validation_split=0.2,
    )
    result = train(cfg, model_cache=model_cache)
    gov = json.loads((result.output / "manifest.json").read_text())["data_governance"]
    found = gov["pii"]["pii"].get("EMAIL", 0) + gov.get("validation_pii", {}).get("pii", {}).get("EMAIL", 0)
    assert found == 1
    assert gov["pii"]["action"] == "redact"
    assert gov["duplicates"]["mode"] == "none" and "contamination" in gov
    assert len(gov["canaries"]) == 1 and gov["canaries"][0]["secret"]


def test_cleaned_split_evidence_names_the_contaminated_examples() -> None:
    train = [_ex(u, a, i + 1) for i, (u, a) in enumerate(BASE)]
    # a held-out split in which the 2nd and 3rd examples copy training examples
    validation = [
        _ex("Do you sell gift cards for the bike shop?", "Yes, from 20 to 500 dollars, online or in store.", 10),
        _ex(BASE[0][0], BASE[0][1], 11),
        _ex(BASE[2][0], BASE[2][1], 12),
    ]
    _, kept, evidence = prepare_training_examples(
        train,
        validation,
        pii="report",
        dedupe="none",
        threshold=0.8,
        canaries=0,
        canary_repeats=1,
        seed=0,
        clean_validation=True,
    )
    assert kept is not None and [ex.line for ex in kept] == [10]
    contamination = evidence["contamination"]
    assert contamination["removed_from_validation"] == 2
    assert sorted(e["validation"] for e in contamination["examples"]) == ["d.jsonl:11", "d.jsonl:12"]
