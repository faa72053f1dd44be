"""Documents per adapter, generated from the registry: a model card and a compliance report.

They are built from the facts ``facts.gather`` collects about one adapter.

``model_card`` arranges it in the sections of Mitchell et al., "Model Cards for Model Reporting"
(FAT* 2019): what the evidence cannot say (intended use, factors, ethical considerations the
owner must weigh) is marked ``TO BE COMPLETED BY THE OWNER``, or taken from the owner's notes.

``compliance_report`` maps each piece of evidence to control ids of NIST AI RMF 1.0, NIST AI 600-1
and ISO/IEC 42001 Annex A through ``assets/controls.yaml`` (the one place the mapping lives, with
its sources). Evidence that is missing is an open item under every control it would support.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import ConfigError
from loraforge.files import write_text_atomic
from loraforge.govern.monitor import describe

ASSETS = Path(__file__).with_name("assets")
CONTROLS = ASSETS / "controls.yaml"
OWNER = "TO BE COMPLETED BY THE OWNER"
NOTE_FIELDS = ("intended_use", "out_of_scope", "users", "factors", "ethical_considerations", "caveats")


@dataclass(frozen=True)
class Evidence:
    """One piece of evidence: whether it is there, what it says in a sentence, and its record."""

    id: str
    title: str
    present: bool
    summary: str
    record: Any = None
    open_item: str | None = None  # what is missing and how to provide it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_controls(path: Path = CONTROLS) -> dict[str, Any]:
    """The mapping, checked: every control an evidence item names is defined under its framework."""
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    for item, spec in data["evidence"].items():
        for framework in data["sources"]:
            for control in spec.get(framework, []):
                if control not in data["controls"][framework]:
                    raise ConfigError(f"{path}: evidence {item!r} names {framework} control {control!r}, not defined")
    return data


def _metrics(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every measured metric with base, adapter and change, each with its interval."""
    if not report:
        return []
    out = []
    for suite in report.get("suites", []):
        for m in suite.get("metrics", []):
            out.append(
                {
                    "suite": suite.get("name"),
                    "id": m.get("id"),
                    "label": m.get("label"),
                    "unit": m.get("unit"),
                    "base": m.get("base"),
                    "adapter": m.get("adapter"),
                    "delta": m.get("delta"),
                }
            )
    return out


def evidence(facts: dict[str, Any], notes: dict[str, Any] | None = None) -> list[Evidence]:
    """The evidence items of ``assets/controls.yaml``, each present or an open item, from ``gather``'s facts."""
    notes = notes or {}
    lineage, adapter = facts["lineage"], facts["adapter"]
    titles = {k: v["title"] for k, v in load_controls()["evidence"].items()}
    items: list[Evidence] = []

    def add(key: str, present: bool, summary: str, record: Any = None, missing: str | None = None) -> None:
        items.append(Evidence(key, titles[key], present, summary, record, None if present else missing))

    licensing = lineage.get("licensing") or {}
    sources = licensing.get("sources") or []
    decisions = licensing.get("decisions") or []
    add(
        "licence_manifest",
        bool(licensing.get("manifest") or sources),
        f"licence check {'passed' if licensing.get('ok') else 'did not pass'}: "
        + (
            ", ".join(f"{d.get('source')} ({d.get('license')}: {d.get('verdict')})" for d in decisions)
            or "no decisions"
        ),
        {
            "manifest": licensing.get("manifest"),
            "policy": licensing.get("policy"),
            "sources": sources,
            "decisions": decisions,
        },
        "no licence manifest was checked in training: declare the data's licences (DATASET.manifest.yaml) and retrain",
    )
    governance = lineage.get("data_governance") or {}
    pii = governance.get("pii") or {}
    add(
        "personal_data",
        bool(pii),
        f"{pii.get('examples_with_pii', 0)} of {pii.get('examples', '?')} training examples held personal data "
        f"(action: {pii.get('action', '?')}); {pii.get('examples_with_secrets', 0)} held secrets",
        {"pii": {k: v for k, v in pii.items() if k != "samples"}, "secrets": governance.get("secrets")},
        "no PII or secret scan of the training data is recorded: train with loraforge (it scans by default)",
    )
    dups, contamination = governance.get("duplicates"), governance.get("contamination")
    add(
        "deduplication",
        dups is not None,
        (f"deduplication {dups.get('mode')}: {dups.get('removed', 0)} removed" if dups else "")
        + (
            f"; {contamination.get('validation_examples_in_training', 0)} validation examples found in training"
            if contamination
            else "; no validation set checked for contamination"
        ),
        {"duplicates": dups, "contamination": contamination},
        "no deduplication record: train with loraforge's data governance on",
    )
    datasets = lineage.get("datasets") or []
    add(
        "lineage",
        bool(adapter["base_sha256"] and adapter["weights_sha256"]),
        f"base {adapter['base_model']} (sha256 {adapter['base_sha256'][:12]}…), {len(datasets)} dataset(s) hashed, "
        f"weights sha256 {adapter['weights_sha256'][:12]}…",
        {"base_model": lineage.get("base_model"), "datasets": datasets, "config": lineage.get("config")},
        "the registration lacks a base model or weights hash",
    )
    evaluations = facts["evaluations"]
    metrics = _metrics(facts["evaluation_report"])
    latest = evaluations[-1] if evaluations else None
    add(
        "evaluation",
        latest is not None,
        (
            f"{len(metrics)} measures against the base model with 95% intervals"
            if metrics
            else "verdict recorded; the report with intervals is not at hand"
        )
        if latest
        else "",
        {"evaluations": evaluations, "metrics": metrics},
        "never evaluated: run `loraforge eval --adapter DIR` and register the adapter again",
    )
    overrides = [h for h in facts["history"] if h["override"]]
    add(
        "gate_decision",
        latest is not None,
        (f"gate verdict {latest['verdict']}" if latest else "")
        + (f"; approved over it: {adapter['release_override']}" if adapter["release_override"] else "")
        + (f"; data governance overridden: {adapter['governance_override']}" if adapter["governance_override"] else "")
        + (
            f"; exceptions taken in training: {', '.join(adapter['governance_flags'])}"
            if adapter["governance_flags"]
            else ""
        ),
        {
            "verdict": latest["verdict"] if latest else None,
            "policy": latest["policy"] if latest else None,
            "release_override": adapter["release_override"],
            "governance_override": adapter["governance_override"],
            "governance_flags": adapter["governance_flags"],
            "override_steps": overrides,
        },
        "no gate decision: evaluate the adapter",
    )
    approvals = [h for h in facts["history"] if h["action"] in ("approve", "reject")]
    creator = adapter["created_by"].get("actor", "unknown")
    add(
        "approvals",
        any(h["action"] == "approve" for h in approvals) and adapter["state"] in ("approved", "deployed", "retired"),
        f"created by {creator}; " + "; ".join(f"{h['action']} by {h['actor']}" for h in approvals),
        {"created_by": adapter["created_by"], "steps": approvals},
        f"not approved (state {adapter['state']}): an approver other than its creator runs `loraforge approve`",
    )
    deployments = facts["deployments"]
    add(
        "deployments",
        bool(deployments),
        "; ".join(f"{d['action']} on {d['route']} by {d['actor']}" for d in deployments),
        deployments,
        "never deployed: `loraforge deploy ROUTE ADAPTER` with an admin's key",
    )
    guard = facts.get("guard") or {}
    checks = {k: v for k, v in (guard.get("rules") or {}).items() if v.get("action") in ("block", "flag")}
    inputs = ", ".join(
        f"{k}: {v['action']}" + (f" at {v['threshold']:g}" if v.get("threshold") else "") for k, v in checks.items()
    )
    add(
        "guardrail_policy",
        False,  # the control asks for output checks too, which the server does not have yet
        f"input checks in place ({inputs}; policy {str(guard.get('sha256'))[:12]})" if checks else "",
        guard or None,
        (
            f"input checks are in place ({inputs}); output checks (moderation, personal data in answers, "
            "training-data leaks) are not: the server has none yet"
            if checks
            else "no guardrail policy is configured for its routes: serving-time input and output checks are not "
            "in place (`guard_policy` in the server's config checks inputs; see docs/guardrails.md)"
        ),
    )
    monitoring = facts.get("monitoring") or {}
    add(
        "monitoring",
        monitoring.get("requests") is not None,
        describe(monitoring) if monitoring.get("requests") else "",
        monitoring or None,
        "no request to it is recorded yet: deploy it on a route (`loraforge monitor` reads every request)",
    )
    stated = {k: notes.get(k) for k in NOTE_FIELDS if notes.get(k)}
    add(
        "intended_use",
        bool(stated.get("intended_use")),
        str(stated.get("intended_use") or ""),
        stated,
        "its owner has not stated its intended use: pass --notes NOTES.yaml (intended_use, out_of_scope, users, "
        "factors, ethical_considerations, caveats)",
    )
    audit = facts["audit"]
    entries = audit.get("entries") or []
    intact = audit.get("available") and not audit.get("problems")
    add(
        "audit_trail",
        bool(intact and entries),
        f"{len(entries)} audit record(s) about it; the log verifies intact" if intact else "",
        {"entries": entries, "problems": audit.get("problems"), "log": audit.get("log")},
        "the audit log is not available here"
        if not audit.get("available")
        else ("the audit log fails verification: " + "; ".join(audit.get("problems") or []))
        if audit.get("problems")
        else "the audit log holds no record about it",
    )
    return items


def compliance_report(facts: dict[str, Any], notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each framework's controls with the evidence that supports them and the open items under them."""
    controls = load_controls()
    items = evidence(facts, notes)
    by_id = {e.id: e for e in items}
    frameworks = []
    for key, source in controls["sources"].items():
        rows = []
        for control, title in controls["controls"][key].items():
            linked = [e for e in items if control in controls["evidence"][e.id].get(key, [])]
            if not linked:
                continue
            rows.append(
                {
                    "control": control,
                    "title": title,
                    "evidence": [e.id for e in linked if e.present],
                    "open_items": [e.id for e in linked if not e.present],
                }
            )
        frameworks.append({"id": key, **source, "controls": rows})
    return {
        "kind": "loraforge.compliance_report",
        "version": controls["version"],
        "mapping": {"file": "loraforge/govern/assets/controls.yaml", "reviewed": controls["reviewed"]},
        "generated_at": facts["generated_at"],
        "adapter": facts["adapter"],
        "evidence": [e.to_json() for e in items],
        "open_items": [{"id": e.id, "title": e.title, "what_to_do": e.open_item} for e in items if not e.present],
        "frameworks": frameworks,
        "evidence_by_id": {k: v.present for k, v in by_id.items()},
    }


def model_card(facts: dict[str, Any], notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sections of Mitchell et al., filled from the evidence; what it cannot say is marked for the owner."""
    notes = notes or {}
    adapter, lineage = facts["adapter"], facts["lineage"]
    config = lineage.get("config") or {}
    lora = {
        k: config[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora") if k in config
    }
    report = facts["evaluation_report"] or {}
    metrics = _metrics(facts["evaluation_report"])
    evaluations = facts["evaluations"]
    latest = evaluations[-1] if evaluations else None
    governance = lineage.get("data_governance") or {}
    approvals = [h for h in facts["history"] if h["action"] == "approve"]

    def owner(field: str) -> Any:
        return notes.get(field) or OWNER

    return {
        "kind": "loraforge.model_card",
        "generated_at": facts["generated_at"],
        "model_details": {
            "name": adapter["name"],
            "type": "LoRA adapter",
            "base_model": adapter["base_model"],
            "base_sha256": adapter["base_sha256"],
            "weights_sha256": adapter["weights_sha256"],
            "lora": lora or None,
            "owner": adapter["owner"],
            "created_by": adapter["created_by"].get("actor"),
            "registered_at": adapter["registered_at"],
            "state": adapter["state"],
            "approved_by": [h["actor"] for h in approvals],
            "release_override": adapter["release_override"],
        },
        "intended_use": {
            "primary_uses": owner("intended_use"),
            "primary_users": owner("users"),
            "out_of_scope": owner("out_of_scope"),
        },
        "factors": owner("factors"),
        "metrics": [{"suite": m["suite"], "measure": m["label"], "unit": m["unit"]} for m in metrics]
        or ("the evaluation's measures are in its report" if latest else OWNER),
        "evaluation_data": {
            "suites": [s.get("name") for s in report.get("suites", [])],
            "sizes": report.get("sizes"),
            "sources": report.get("sources") or None,
            "validation": [d.get("path") for d in lineage.get("datasets") or [] if d.get("role") == "validation"],
            "gate_policy": (latest["policy"] or {}).get("name") if latest else None,
        }
        if latest
        else OWNER,
        "training_data": {
            "datasets": [
                {k: d.get(k) for k in ("role", "path", "sha256", "format", "examples", "tokens", "trained_tokens")}
                for d in lineage.get("datasets") or []
            ]
            or OWNER,
            "licences": [
                {"source": d.get("source"), "license": d.get("license"), "verdict": d.get("verdict")}
                for d in (lineage.get("licensing") or {}).get("decisions") or []
            ],
            "personal_data": {k: v for k, v in (governance.get("pii") or {}).items() if k != "samples"} or None,
            "deduplication": governance.get("duplicates"),
        },
        "quantitative_analyses": metrics
        or ({"verdict": latest["verdict"], "headline": latest["headline"]} if latest else OWNER),
        "ethical_considerations": {
            "governance_exceptions": adapter["governance_flags"],
            "governance_override": adapter["governance_override"],
            "owner": owner("ethical_considerations"),
        },
        "caveats_and_recommendations": {
            "gate": latest["verdict"] if latest else "not evaluated",
            "release_override": adapter["release_override"],
            "owner": owner("caveats"),
        },
    }


def read_notes(path: Path | None) -> dict[str, Any]:
    """The owner's notes (YAML) for the fields the evidence cannot fill."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the notes {path}: {e}") from e
    if not isinstance(data, dict) or set(data) - set(NOTE_FIELDS):
        raise ConfigError(f"{path}: the notes are a mapping of {', '.join(NOTE_FIELDS)}; found {sorted(data)}")
    return {k: str(v) for k, v in data.items()}


def write_documents(facts: dict[str, Any], out: Path, notes: dict[str, Any] | None = None) -> list[Path]:
    """Write ``model_card.{json,html}`` and ``compliance.{json,html}`` into ``out`` (each atomically)."""
    from loraforge.govern.report_html import render

    out.mkdir(parents=True, exist_ok=True)
    card, compliance = model_card(facts, notes), compliance_report(facts, notes)
    written = []
    for stem, doc in (("model_card", card), ("compliance", compliance)):
        write_text_atomic(out / f"{stem}.json", json.dumps(doc, indent=2, ensure_ascii=False, default=str))
        write_text_atomic(out / f"{stem}.html", render(stem, doc))
        written += [out / f"{stem}.json", out / f"{stem}.html"]
    return written
