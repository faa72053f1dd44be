"""Everything the registry, and the files it points to, holds about one adapter.

``gather`` collects the evidence: its lineage (base model, datasets, configuration, checksums), the
licence and data-governance records of its training data, its evaluations (with the 95% intervals
of ``eval.json`` when the report is at hand), the gate's verdict and every override, its release
history (approvals, rejections, deployments, rollbacks), its record in production, the guard
policy a server applies to its owner's requests, and the audit log's records about it with the
log's verification. ``reports.py`` arranges them into documents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from loraforge.errors import ConfigError
from loraforge.govern.audit import AuditLog, verify_audit_log
from loraforge.govern.monitor import production_record
from loraforge.govern.release import Principal, history, in_scope, latest_evaluation
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter, Deployment, Evaluation, Job


def gather(
    registry: Registry,
    name: str,
    *,
    audit: AuditLog | None = None,
    witness: dict[str, Any] | None = None,
    who: Principal | None = None,
) -> dict[str, Any]:
    """Everything the registry (and the files it names) holds about adapter ``name``.

    Raises:
        ConfigError: no such adapter (or not one ``who`` may read).
    """
    with registry.reading() as s:
        row = s.get(Adapter, name)
        if row is None or (who is not None and not in_scope(who, row.tenant)):
            raise ConfigError(f"no adapter {name!r}; `loraforge adapters list` shows them")
        evaluations = s.scalars(
            select(Evaluation).where(Evaluation.adapter == name).order_by(Evaluation.created_at)
        ).all()
        latest = latest_evaluation(s, name)
        steps = history(s, name)
        deployments = s.scalars(select(Deployment).where(Deployment.adapter == name).order_by(Deployment.id)).all()
        job = s.get(Job, row.job_id) if row.job_id else None
        adapter = {
            "name": row.name,
            "owner": row.tenant or "public",
            "state": row.state,
            "base_model": row.base_model,
            "base_sha256": row.base_sha256,
            "weights_sha256": row.weights_sha256,
            "config_sha256": row.config_sha256,
            "source": row.source,
            "registered_at": row.added_at,
            "created_by": row.created_by or {},
            "job": row.job_id,
            "governance_flags": list(row.governance_flags or []),
            "governance_override": row.governance_override,
            "release_override": row.release_override,
        }
        lineage = dict(row.lineage or {})
        evaluation_rows = [
            {
                "id": e.id,
                "verdict": e.verdict,
                "policy": e.policy,
                "headline": e.headline,
                "report": e.report_path,
                "created_at": e.created_at,
            }
            for e in evaluations
        ]
        latest_report = latest.report_path if latest is not None else None
        routes = sorted({d.route for d in deployments})
        deployment_rows = [
            {
                "route": d.route,
                "action": d.action,
                "actor": d.actor,
                "reason": d.reason,
                "from": d.created_at,
                "until": d.ended_at,
            }
            for d in deployments
        ]
        monitoring = production_record(s, name)
        job_row = (
            {"id": job.id, "status": job.status, "created_by": job.created_by, "trained_tokens": job.trained_tokens}
            if job
            else None
        )
    report = _eval_json(latest_report)
    audit_part: dict[str, Any] = {"available": False}
    guard: dict[str, Any] | None = None
    if audit is not None and audit.path.is_file():
        targets = {name, *routes}
        every = audit.entries()
        entries = [e for e in every if e.get("target") in targets]
        guard = guard_policy(every, row.tenant)
        problems = verify_audit_log(audit.path, key_file=audit.key_file, witness=witness)
        audit_part = {"available": True, "entries": entries, "problems": problems, "log": str(audit.path)}
    return {
        "generated_at": time.time(),
        "adapter": adapter,
        "lineage": lineage,
        "job": job_row,
        "evaluations": evaluation_rows,
        "evaluation_report": report,
        "history": steps,
        "deployments": deployment_rows,
        "monitoring": monitoring,
        "guard": guard,
        "audit": audit_part,
    }


def guard_policy(entries: list[dict[str, Any]], tenant: str | None) -> dict[str, Any] | None:
    """The guard rules that apply to ``tenant``'s requests under the policy a server loaded last
    (its ``guard.policy`` audit record), or None when no server has recorded one."""
    loaded = [e for e in entries if e.get("action") == "guard.policy"]
    if not loaded:
        return None
    details = loaded[-1].get("details") or {}
    rules = ((details.get("tenants") or {}).get(tenant or "") or details.get("default")) or {}
    return {"sha256": details.get("sha256"), "loaded_at": loaded[-1].get("ts"), "rules": rules}


def _eval_json(html: str | None) -> dict[str, Any] | None:
    """``eval.json`` beside the evaluation's HTML report, when it is still there."""
    if not html:
        return None
    path = Path(html).with_name("eval.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
