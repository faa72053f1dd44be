"""Licence manifests and the policy: table-driven decisions, clear errors, and a train that refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.data.formats import load_dataset
from loraforge.data.licensing import (
    LicenseError,
    Source,
    check_licensing,
    decide,
    load_manifest,
    load_policy,
    manifest_path_for,
)
from tests.conftest import chat

POLICY_CASES = [
    # (licence, extra fields, verdict, blocks training)
    ("MIT", {}, "allow", False),
    ("Apache-2.0", {}, "allow", False),
    ("CC0-1.0", {}, "allow", False),
    ("CC-BY-4.0", {}, "allow", False),
    ("CC-BY-NC-4.0", {}, "review", True),
    ("CC-BY-NC-4.0", {"approved_by": "Dana, legal", "reason": "research only"}, "review", False),
    ("CC-BY-ND-4.0", {}, "review", True),
    ("CC-BY-SA-4.0", {}, "review", True),
    ("GPL-3.0-only", {}, "review", True),
    ("LicenseRef-AcmeTerms", {}, "review", True),
    ("NOASSERTION", {}, "review", True),
    ("NONE", {}, "deny", True),
    ("LicenseRef-Proprietary", {}, "deny", True),
    ("LicenseRef-Proprietary", {"approved_by": "x", "reason": "y"}, "deny", True),  # approval can't replace permission
    ("LicenseRef-Proprietary", {"permission": "contract 2026-114"}, "allow", False),
    ("Zlib", {}, "allow", False),
    ("EUPL-1.2", {}, "review", True),  # valid SPDX, not listed: the default
]


def test_ids_are_case_insensitive_and_proprietary_cannot_hide(tmp_path: Path) -> None:
    p = _manifest(
        tmp_path,
        "sources:\n  - path: a\n    license: licenseref-proprietary\n    owner: x\n    personal_data: false\n"
        "    approved_by: y\n    reason: z\n  - path: b\n    license: mit\n    owner: x\n    personal_data: false\n",
    )
    manifest = load_manifest(p)
    assert [s.license for s in manifest.sources] == ["LicenseRef-Proprietary", "MIT"]
    assert decide(manifest.sources[0], load_policy()).verdict == "deny"


def test_most_restrictive_rule_wins_and_policy_typos_are_caught(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("allow: ['CC-BY-*']\nreview: ['*-NC*']\n")
    source = Source(license="CC-BY-NC-4.0", owner="o", personal_data=False, line=1, path="d")
    assert decide(source, load_policy(policy)).verdict == "review"
    policy.write_text("allow: [Apache2.0]\n")
    with pytest.raises(LicenseError, match=r"did you mean Apache-2\.0"):
        load_policy(policy)


@pytest.mark.parametrize(("license_id", "extra", "verdict", "blocks"), POLICY_CASES)
def test_default_policy_decisions(license_id: str, extra: dict[str, str], verdict: str, blocks: bool) -> None:
    source = Source(license=license_id, owner="o", personal_data=False, line=1, path="d.jsonl", **extra)
    decision = decide(source, load_policy())
    assert (decision.verdict, decision.blocks_training) == (verdict, blocks), decision.rule


def _manifest(tmp_path: Path, text: str, name: str = "data.manifest.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_spdx_id_lists_close_matches(tmp_path: Path) -> None:
    p = _manifest(
        tmp_path, "sources:\n  - path: data.jsonl\n    license: Apache2.0\n    owner: me\n    personal_data: false\n"
    )
    with pytest.raises(
        LicenseError, match=r"data\.manifest\.yaml:2: 'Apache2\.0' is not an SPDX licence id; did you mean Apache-2\.0"
    ):
        load_manifest(p)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            "sources:\n  - path: a\n    license: MIT\n    owner: me\n    personal_data: false\n"
            "  - path: b\n    license: MIT\n",
            ":6: missing owner, personal_data",
        ),
        ("sources:\n  - license: MIT\n    owner: me\n    personal_data: false\n", ":2: give exactly one of `path`"),
        (
            "sources:\n  - path: a\n    license: MIT\n    owner: me\n    personal_data: maybe\n",
            ":2: personal_data must be true or false",
        ),
        ("sources:\n  - path: a\n    licence: MIT\n", ":2: unknown key(s) 'licence'"),
        ("sources: [\n", ": invalid YAML"),
        ("other: 1\n", "expected `sources:`"),
        (
            "sources:\n  - path: a\n    license: MIT\n    owner: me\n    personal_data: false\n    approved_by: x\n",
            "needs both approved_by and reason",
        ),
    ],
)
def test_malformed_manifest_names_the_line(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(LicenseError) as e:
        load_manifest(_manifest(tmp_path, body))
    assert needle in str(e.value)


def test_records_matched_by_file_and_by_source_tag(tmp_path: Path, write_jsonl) -> None:  # type: ignore[no-untyped-def]
    records = [chat(f"q{i}", f"a{i}") for i in range(4)]
    records[1]["source"] = "vendor"
    records[2]["source"] = "unknown-tag"
    data = write_jsonl(records)
    assert manifest_path_for(data) == tmp_path / "data.manifest.yaml"
    _manifest(
        tmp_path,
        "sources:\n"
        "  - path: data.jsonl\n    license: CC0-1.0\n    owner: us\n    personal_data: false\n"
        "  - source: vendor\n    license: CC-BY-NC-4.0\n    owner: Vendor Ltd\n    personal_data: true\n",
    )
    report = check_licensing([(data, load_dataset(data).examples)])
    # a tag that names no source is not covered (a typo must not borrow the file's licence)
    assert report.examples_per_source == {"path data.jsonl": 2, "source 'vendor'": 1}
    assert report.uncovered == [(str(data), 3)]
    assert not report.ok
    assert any("needs review" in p and "vendor" in p for p in report.problems())
    summary = report.to_json()
    assert summary["policy"]["name"] == "loraforge-default" and len(summary["decisions"]) == 2


def test_missing_manifest_and_uncovered_records(tmp_path: Path, write_jsonl) -> None:  # type: ignore[no-untyped-def]
    data = write_jsonl([chat("q", "a")])
    report = check_licensing([(data, load_dataset(data).examples)])
    assert report.manifest is None and not report.ok and report.problems()[0] == f"{data}: no licence manifest"
    _manifest(tmp_path, "sources:\n  - path: other.jsonl\n    license: MIT\n    owner: x\n    personal_data: false\n")
    report = check_licensing([(data, load_dataset(data).examples)])
    assert report.uncovered == [(str(data), 1)]


def _train_cfg(tmp_path: Path, data: Path, tiny: Path, **kw: object):  # type: ignore[no-untyped-def]
    from loraforge.train import TrainConfig

    return TrainConfig(
        data=str(data),
        output=str(tmp_path / "out"),
        base_model=str(tiny),
        max_steps=1,
        seq_len=256,
        eval_every=0,
        checkpoint_every=0,
        **kw,  # type: ignore[arg-type]
    )


def test_denied_licence_stops_train_and_writes_nothing(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from loraforge.train import train

    data = write_jsonl([chat(f"q{i}", f"a{i}") for i in range(12)])
    _manifest(
        tmp_path,
        "sources:\n  - path: data.jsonl\n    license: LicenseRef-Proprietary\n"
        "    owner: Acme\n    personal_data: false\n",
    )
    with pytest.raises(
        LicenseError,
        match=r"path data\.jsonl: licence LicenseRef-Proprietary is denied .*without a recorded permission",
    ):
        train(_train_cfg(tmp_path, data, tiny_model_dir, allow_unlicensed=True), model_cache=model_cache)
    assert not (tmp_path / "out").exists()


def test_unlicensed_needs_the_flag_and_it_is_recorded(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from loraforge.train import train

    data = write_jsonl([chat(f"q{i}", f"a{i}") for i in range(12)])
    with pytest.raises(LicenseError, match="--allow-unlicensed"):
        train(_train_cfg(tmp_path, data, tiny_model_dir), model_cache=model_cache)
    assert not (tmp_path / "out").exists()
    result = train(_train_cfg(tmp_path, data, tiny_model_dir, allow_unlicensed=True), model_cache=model_cache)
    licensing = json.loads((result.output / "manifest.json").read_text())["licensing"]
    assert licensing["allow_unlicensed"] is True and licensing["manifest"] is None


def test_cleared_review_trains_and_lineage_lists_sources(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from loraforge.train import train

    data = write_jsonl([chat(f"q{i}", f"a{i}") for i in range(12)])
    _manifest(
        tmp_path,
        "sources:\n  - path: data.jsonl\n    license: CC-BY-NC-4.0\n    owner: Lab\n    personal_data: false\n"
        "    approved_by: Dana Ruiz\n    reason: internal research use\n",
    )
    result = train(_train_cfg(tmp_path, data, tiny_model_dir), model_cache=model_cache)
    licensing = json.loads((result.output / "manifest.json").read_text())["licensing"]
    assert licensing["ok"] and licensing["manifest"]["sha256"]
    assert licensing["decisions"][0]["cleared_by"] == "Dana Ruiz: internal research use"
    assert licensing["sources"][0]["examples"] == 12
