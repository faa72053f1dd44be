"""The model card and compliance report of an adapter trained, evaluated and released like the demo's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loraforge.errors import ConfigError
from loraforge.evaluate import EvalConfig, evaluate
from loraforge.govern.audit_witness import audit_log
from loraforge.govern.deploy import Deployments
from loraforge.govern.facts import gather
from loraforge.govern.release import Release
from loraforge.govern.reports import CONTROLS, OWNER, compliance_report, load_controls, model_card
from loraforge.serve.adapters import AdapterStore
from loraforge.serve.home_registry import home_registry
from loraforge.serve.keys import KeyStore
from loraforge.train import TrainConfig, train
from tests.evaluate.test_evaluate import SMALL

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "loraforge" / "samples"


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, model_cache: Path):  # type: ignore[no-untyped-def]
    """The demo's path on the tiny model: the bundled, licensed sample data checked and trained on,
    evaluated against the base, registered, approved by another person, deployed on a route."""
    root = tmp_path_factory.mktemp("released")
    config = TrainConfig(
        data=str(SAMPLES / "support.jsonl"),
        validation=str(SAMPLES / "support_holdout.jsonl"),
        output=str(root / "adapter"),
        base_model=str(tiny_model_dir),
        seq_len=256,
        batch_rows=4,
        max_steps=4,
        eval_every=0,
        checkpoint_every=0,
        seed=1,
    )
    adapter = train(config, model_cache=model_cache).output
    evaluate(EvalConfig(adapter, suites=("task",), sizes=SMALL, report=adapter / "eval"), model_cache=model_cache)
    home = root / "home"
    registry = home_registry(home)
    audit = audit_log(home, registry)
    store = AdapterStore(home, registry=registry)
    keys = KeyStore(home, registry)
    dev = keys.create("acme", "developer", owner="dana")[1]
    with audit.action("key:" + dev.id, "adapter.add", "support"):
        store.add(
            adapter, "support", tenant="acme", created_by={"actor": f"key:{dev.id}", "key": dev.id, "owner": "dana"}
        )
    approver, admin = keys.create("acme", "approver", owner="ana")[1], keys.create("acme", "admin", owner="ops")[1]
    release = Release(registry, audit)
    status = release.status(admin, "support")
    release.approve(approver, "support", reason="reviewed", override=None if status["verdict"] == "PASS" else "demo")
    Deployments(registry, audit).deploy(admin, "support-bot", "support", reason="first release")
    return home, registry, audit


def test_the_mapping_file_is_consistent_and_cites_its_sources(tmp_path: Path) -> None:
    data = load_controls()
    assert {s["name"] for s in data["sources"].values()} == {"NIST AI RMF 1.0", "NIST AI 600-1", "ISO/IEC 42001:2023"}
    assert all(s["url"].startswith("https://") for s in data["sources"].values())
    assert "MEASURE 2.11" in data["controls"]["nist_ai_rmf"] and "A.7.5" in data["controls"]["iso_42001"]
    broken = yaml.safe_load(CONTROLS.read_text())
    broken["evidence"]["approvals"]["iso_42001"].append("A.99")
    bad = tmp_path / "controls.yaml"
    bad.write_text(yaml.safe_dump(broken))
    with pytest.raises(ConfigError, match=r"names iso_42001 control 'A\.99', not defined"):
        load_controls(bad)


def test_compliance_report_maps_the_evidence_and_names_what_is_missing(released) -> None:  # type: ignore[no-untyped-def]
    _, registry, audit = released
    report = compliance_report(gather(registry, "support", audit=audit))
    present = {e["id"] for e in report["evidence"] if e["present"]}
    assert present == {
        "licence_manifest",
        "personal_data",
        "deduplication",
        "lineage",
        "evaluation",
        "gate_decision",
        "approvals",
        "deployments",
        "audit_trail",
    }
    assert {o["id"] for o in report["open_items"]} == {"guardrail_policy", "monitoring", "intended_use"}
    rows = {
        (fw["id"], c["control"]): (set(c["evidence"]), set(c["open_items"]))
        for fw in report["frameworks"]
        for c in fw["controls"]
    }
    assert "licence_manifest" in rows[("nist_ai_rmf", "MAP 4.1")][0]
    assert "licence_manifest" in rows[("iso_42001", "A.7.5")][0]
    assert "personal_data" in rows[("nist_ai_rmf", "MEASURE 2.10")][0]
    assert "evaluation" in rows[("nist_ai_rmf", "MEASURE 2.11")][0]
    assert "approvals" in rows[("nist_ai_rmf", "GOVERN 2.1")][0]
    assert "deployments" in rows[("nist_ai_rmf", "MANAGE 2.4")][0]
    assert "audit_trail" in rows[("iso_42001", "A.6.2.8")][0]
    assert rows[("nist_ai_rmf", "MEASURE 2.4")][1] == {"monitoring"}  # open, never skipped
    assert "guardrail_policy" in rows[("nist_ai_600_1", "Information Security")][1]
    licence = next(e for e in report["evidence"] if e["id"] == "licence_manifest")
    assert "licence check passed" in licence["summary"]


def test_model_card_fills_mitchell_sections_and_marks_the_owners(released) -> None:  # type: ignore[no-untyped-def]
    _, registry, audit = released
    facts = gather(registry, "support", audit=audit)
    card = model_card(facts)
    for section in (
        "model_details",
        "intended_use",
        "factors",
        "metrics",
        "evaluation_data",
        "training_data",
        "quantitative_analyses",
        "ethical_considerations",
        "caveats_and_recommendations",
    ):
        assert section in card
    assert card["intended_use"]["primary_uses"] == OWNER and card["factors"] == OWNER
    assert card["model_details"]["approved_by"] and card["model_details"]["state"] == "deployed"
    analyses = card["quantitative_analyses"]
    assert isinstance(analyses, list) and all("low" in m["delta"] for m in analyses)  # with intervals
    noted = model_card(facts, {"intended_use": "answer customers' questions about orders"})
    assert noted["intended_use"]["primary_uses"] == "answer customers' questions about orders"
    assert "intended_use" not in {
        o["id"] for o in compliance_report(facts, noted and {"intended_use": "x"})["open_items"]
    }


def test_cli_report_writes_both_documents(released, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from loraforge.cli import app

    home, _, _ = released
    notes = tmp_path / "notes.yaml"
    notes.write_text("intended_use: order questions of Acme's customers\ncaveats: English only\n")
    out = tmp_path / "docs"
    result = CliRunner().invoke(
        app, ["report", "support", "--out", str(out), "--notes", str(notes), "--home", str(home)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "compliance.html",
        "compliance.json",
        "model_card.html",
        "model_card.json",
    ]
    html = (out / "compliance.html").read_text()
    assert "MEASURE 2.10" in html and "A.7.5" in html and "Open items" in html
    card = json.loads((out / "model_card.json").read_text())
    assert card["caveats_and_recommendations"]["owner"] == "English only"
    assert OWNER in (out / "model_card.html").read_text()  # what is still unknown is marked


def test_the_guard_policy_a_server_loaded_is_cited_and_output_checks_stay_open(released) -> None:  # type: ignore[no-untyped-def]
    _, registry, audit = released
    policy = {
        "default": {"prompt_injection": {"action": "flag", "threshold": None}},
        "tenants": {"acme": {"prompt_injection": {"action": "block", "threshold": 0.7}}},
    }
    audit.record("server", "guard.policy", "guard-policy:abc", sha256="ab" * 32, **policy)
    facts = gather(registry, "support", audit=audit)
    assert facts["guard"]["rules"] == {"prompt_injection": {"action": "block", "threshold": 0.7}}  # acme's own
    item = next(o for o in compliance_report(facts)["open_items"] if o["id"] == "guardrail_policy")
    assert "input checks are in place (prompt_injection: block at 0.7)" in item["what_to_do"]
    assert "output checks" in item["what_to_do"]
    audit.record("server", "guard.policy", "guard-policy:def", sha256="cd" * 32, default={}, tenants={})
    assert "no guardrail policy" in next(
        o["what_to_do"]
        for o in compliance_report(gather(registry, "support", audit=audit))["open_items"]
        if o["id"] == "guardrail_policy"
    )
