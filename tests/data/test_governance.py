"""Duplicates, contamination, canaries, and the governance evidence a training run records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraforge.data.dedup import find_contamination, find_duplicates
from loraforge.data.formats import Example, Message
from loraforge.data.governance import (
    FLAG_CODES,
    flags_from_evidence,
    make_canaries,
    prepare_training_examples,
)
from loraforge.data.licensing import DEFAULT_POLICY, check_licensing, manifest_path_for
from loraforge.data.pii import PiiAction
from loraforge.errors import ModelError
from loraforge.models.manifest import AdapterManifest
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


def _manifest_flags(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """The governance flags of an adapter manifest holding ``manifest``'s fields (and a base model)."""
    return AdapterManifest.from_json({"base_model": {"name": "base"}, **manifest}, "manifest.json").flags()


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


# --- secrets are redacted at training time whatever the PII action, unless allow_secrets ----------------------

OPENAI_KEY = "sk-proj-" + "Q7w9Xk2Lm4Pz8Rt6Yb3Nc5Vd1Hf0Gj"  # the shape secrets_scan knows; not a real key


def _with_secret() -> list[Example]:
    train = [_ex(u, a, i + 1) for i, (u, a) in enumerate(BASE)]
    train.append(_ex(f"My key is {OPENAI_KEY}, mail me at maria@example.com", "Thanks, I will rotate it.", 5))
    return train


SECRET_CASES = [
    # (pii action, allow_secrets, key still in the data, email still in the data, examples kept, handling, redacted)
    ("report", False, False, True, 5, "redacted", 1),
    ("report", True, True, True, 5, "kept", 0),
    ("redact", False, False, False, 5, "redacted", 1),
    ("redact", True, False, False, 5, "redacted", 1),
    ("drop", False, False, False, 4, "dropped", 0),
    ("drop", True, False, False, 4, "dropped", 0),
]


@pytest.mark.parametrize(("pii", "allow", "key_kept", "email_kept", "n", "handling", "redacted"), SECRET_CASES)
def test_secrets_are_redacted_unless_allowed(
    pii: PiiAction, allow: bool, key_kept: bool, email_kept: bool, n: int, handling: str, redacted: int
) -> None:
    validation = [_ex(f"Use {OPENAI_KEY} for the API", "Done.", 1), _ex("Hello", "Hi there.", 2)]
    kept, val_kept, evidence = prepare_training_examples(
        _with_secret(),
        validation,
        pii=pii,
        dedupe="none",
        threshold=0.8,
        canaries=0,
        canary_repeats=1,
        seed=0,
        allow_secrets=allow,
    )
    text = " ".join(m.content for ex in kept for m in ex.messages)
    assert (OPENAI_KEY in text) is key_kept and ("maria@example.com" in text) is email_kept
    assert len(kept) == n
    if pii == "report" and not allow:
        assert "My key is <SECRET_OPENAI_KEY_1>, mail me at maria@example.com" in text
    val_text = " ".join(m.content for ex in val_kept or [] for m in ex.messages)
    assert (OPENAI_KEY in val_text) is key_kept  # validation data is shown to the model too
    assert evidence["secrets"] == {
        "allow_secrets": allow,
        "handling": handling,
        "found": 1,
        "redacted": redacted,
        "examples_dropped": 1 if handling == "dropped" else 0,
        "validation_found": 1,
        "validation_redacted": redacted,
    }
    assert evidence["pii"]["pii"] == {"EMAIL": 1}  # personal data is reported in every mode


# --- governance flags: one per exception taken, computed from the evidence a manifest holds -------------------


def _licensing(
    tmp_path: Path, manifest: str | None, policy: str | None = None, allow_unlicensed: bool = False
) -> dict[str, Any]:
    """The `licensing` evidence of a run, made by the real licence check."""
    data = tmp_path / "d.jsonl"
    data.write_text("")
    if manifest is not None:
        manifest_path_for(data).write_text(manifest)
    policy_path = None
    if policy is not None:
        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text(policy)
    examples = [_ex("q", "a", 1)]
    report = check_licensing([(data, examples)], policy=policy_path)
    return {**report.to_json(), "allow_unlicensed": allow_unlicensed}


def _evidence(allow_secrets: bool = False, secrets_found: int = 0) -> dict[str, Any]:
    examples = [_ex(f"key {OPENAI_KEY}", "ok", 1)] if secrets_found else [_ex("q", "a", 1)]
    *_, evidence = prepare_training_examples(
        examples,
        None,
        pii="report",
        dedupe="none",
        threshold=0.8,
        canaries=0,
        canary_repeats=1,
        seed=0,
        allow_secrets=allow_secrets,
    )
    return evidence


MIT = "sources:\n  - path: d.jsonl\n    license: MIT\n    owner: Brightpath Bikes\n    personal_data: false\n"
NC = "sources:\n  - path: d.jsonl\n    license: CC-BY-NC-4.0\n    owner: Community forum\n    personal_data: true\n"

FLAG_CASES = [
    # (name, manifest, policy, allow_unlicensed, allow_secrets, secrets found, expected flags and words of the detail)
    ("nothing taken", MIT, None, False, False, 0, []),
    ("a secret redacted is no exception", MIT, None, False, False, 1, []),
    (
        "unlicensed",
        None,
        None,
        True,
        False,
        0,
        [("allow_unlicensed", "1 data file without a licence manifest, 1 record covered by no")],
    ),
    ("unlicensed, needlessly", MIT, None, True, False, 0, [("allow_unlicensed", "every record had a licence source")]),
    ("secrets kept", MIT, None, False, True, 1, [("allow_secrets", "1 secret (API keys")]),
    ("secrets allowed, none found", MIT, None, False, True, 0, [("allow_secrets", "no secret was found")]),
    ("own policy", MIT, "allow: [MIT]\n", False, False, 0, [("non_default_policy", "not by loraforge's default")]),
    (
        "approved by the owner",
        NC + "    approved_by: Community Forum\n    reason: we agree\n",
        None,
        False,
        False,
        0,
        [("self_attested_approval", "by 'Community Forum'")],
    ),
    (
        "approved by no one",
        NC + "    approved_by: me\n    reason: fine\n",
        None,
        False,
        False,
        0,
        [("self_attested_approval", "cleared by the data's own owner or by no named approver")],
    ),
    (
        "approved by legal",
        NC + "    approved_by: Dana Ruiz, legal\n    reason: research only\n",
        None,
        False,
        False,
        0,
        [],
    ),
    (
        "everything at once",
        None,
        "allow: [MIT]\n",
        True,
        True,
        1,
        [
            ("allow_unlicensed", "--allow-unlicensed"),
            ("allow_secrets", "--allow-secrets"),
            ("non_default_policy", "policy"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("name", "manifest", "policy", "unlicensed", "allow_secrets", "found", "expected"),
    FLAG_CASES,
    ids=[c[0] for c in FLAG_CASES],
)
def test_governance_flags_name_every_exception(
    tmp_path: Path,
    name: str,
    manifest: str | None,
    policy: str | None,
    unlicensed: bool,
    allow_secrets: bool,
    found: int,
    expected: list[tuple[str, str]],
) -> None:
    licensing = _licensing(tmp_path, manifest, policy, unlicensed)
    flags = flags_from_evidence(licensing, _evidence(allow_secrets, found))
    assert [f["flag"] for f in flags] == [code for code, _ in expected]
    for f, (_, words) in zip(flags, expected, strict=True):
        assert words in f["detail"] and f["detail"].endswith("."), f
    assert set(FLAG_CODES) >= {f["flag"] for f in flags}
    manifest_json = {
        "licensing": licensing,
        "data_governance": _evidence(allow_secrets, found),
        "governance_flags": flags,
    }
    assert _manifest_flags(json.loads(json.dumps(manifest_json))) == flags


def test_a_copy_of_the_default_policy_is_the_default(tmp_path: Path) -> None:
    licensing = _licensing(tmp_path, MIT, DEFAULT_POLICY.read_text())
    assert licensing["policy"]["default"] is True
    assert flags_from_evidence(licensing, _evidence()) == []


def test_old_manifests_get_flags_from_their_evidence(tmp_path: Path) -> None:
    licensing = _licensing(tmp_path, None, "allow: [MIT]\n", allow_unlicensed=True)
    del licensing["policy"]["default"]  # written before the record said
    governance = _evidence(allow_secrets=True, secrets_found=1)
    del governance["secrets"]  # trained before secrets were redacted by default: --pii report kept them
    flags = _manifest_flags({"licensing": licensing, "data_governance": governance})
    assert [f["flag"] for f in flags] == ["allow_unlicensed", "allow_secrets", "non_default_policy"]
    assert "before loraforge redacted secrets by default" in flags[1]["detail"]
    assert _manifest_flags({"kind": "loraforge.adapter"}) == []  # nothing to derive them from


@pytest.mark.parametrize("bad", [[{"flag": "allow_secrets"}], "allow_secrets", [{"flag": 1, "detail": "x"}], ["x"]])
def test_a_damaged_flag_list_is_an_error_not_silence(bad: object) -> None:
    with pytest.raises(ModelError, match=r"manifest\.json: field governance_flags.*the manifest is damaged"):
        _manifest_flags({"governance_flags": bad})
