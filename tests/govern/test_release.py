"""The release lifecycle: the approval rules as a table, then the steps on a real registry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from loraforge.errors import ReleaseError
from loraforge.govern.audit import AuditLog, verify_audit_log
from loraforge.govern.deploy import Deployments, resolve
from loraforge.govern.release import Approval, ApprovalCase, Release, approval_problem, creator, register_step
from loraforge.registry.database import open_registry
from loraforge.registry.schema import Adapter, Evaluation
from loraforge.serve.keys import KeyRecord, KeyStore

DEV = {"actor": "key:dev1 (dana)", "key": "dev1", "owner": "dana"}


def case(**changes: object) -> ApprovalCase:
    base: dict[str, object] = {
        "role": "approver",
        "in_scope": True,
        "state": "evaluated",
        "verdict": "PASS",
        "created_by": DEV,
        "key_id": "app1",
        "owner": "alex",
        "approvals": (),
        "required": 1,
        "override_reason": None,
    }
    base.update(changes)
    return ApprovalCase(**base)  # type: ignore[arg-type]


# (why, the case's changes, the refusal's code or None when the approval is recorded)
RULES = [
    ("an approver approves an evaluated adapter that passed", {}, None),
    ("a developer key cannot approve", {"role": "developer"}, "approver_required"),
    ("an admin key cannot approve either", {"role": "admin"}, "approver_required"),
    ("an auditor key cannot approve", {"role": "auditor"}, "approver_required"),
    ("another tenant's adapter reads as missing", {"in_scope": False}, "adapter_not_found"),
    ("a draft (never evaluated) cannot be approved", {"state": "draft", "verdict": None}, "not_evaluated"),
    ("a retired adapter cannot", {"state": "retired"}, "bad_state"),
    ("a deployed adapter has nothing to approve", {"state": "deployed"}, "bad_state"),
    ("approved with all approvals in", {"state": "approved", "approvals": (Approval("x", "xo", False),)}, "bad_state"),
    ("the creator's key cannot approve", {"key_id": "dev1", "owner": None}, "separation_of_duties"),
    (
        "the creator's other key cannot approve (same owner)",
        {"key_id": "other", "owner": "dana"},
        "separation_of_duties",
    ),
    ("a key without owner, not the creator's, may", {"owner": None}, None),
    ("a failed gate needs an override", {"verdict": "FAIL"}, "gate_override_required"),
    ("an inconclusive gate needs one too", {"verdict": "INCONCLUSIVE"}, "gate_override_required"),
    ("a blank override is no reason", {"verdict": "FAIL", "override_reason": "  "}, "gate_override_required"),
    ("a failed gate with a written override", {"verdict": "FAIL", "override_reason": "known regression, fixed"}, None),
    (
        "second approver: the first one cannot sign twice",
        {"required": 2, "approvals": (Approval("app1", "alex", False),)},
        "already_approved",
    ),
    (
        "second approver: the first one's other key cannot either",
        {"required": 2, "key_id": "app9", "approvals": (Approval("app1", "alex", False),)},
        "already_approved",
    ),
    (
        "second approver: a different person signs",
        {"required": 2, "key_id": "app2", "owner": "bo", "approvals": (Approval("app1", "alex", False),)},
        None,
    ),
]


@pytest.mark.parametrize(("why", "changes", "code"), RULES, ids=[r[0] for r in RULES])
def test_approval_rules(why: str, changes: dict[str, object], code: str | None) -> None:
    problem = approval_problem(case(**changes))
    assert (problem.code if problem else None) == code, why


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A registry with keys of each role and a helper that registers an adapter with a verdict."""
    registry = open_registry(tmp_path)
    store = KeyStore(tmp_path, registry)

    def key(role: str, tenant: str = "acme", owner: str | None = None, **kw: object) -> KeyRecord:
        return store.create(tenant, role, owner=owner, **kw)[1]  # type: ignore[arg-type]

    def adapter(name: str, verdict: str | None, by: KeyRecord, tenant: str | None = "acme") -> None:
        now = time.time()
        with registry.session() as s:
            if tenant:
                from loraforge.registry.schema import ensure_tenant

                ensure_tenant(s, tenant, now)
            row = Adapter(
                name=name,
                tenant=tenant,
                base_model="base",
                base_sha256="b" * 64,
                weights_sha256="w" * 64,
                config_sha256="c" * 64,
                source="/x",
                lineage={},
                governance_flags=[],
                added_at=now,
                created_by=creator(by, ""),
            )
            s.add(row)
            if verdict:
                s.add(Evaluation(id=f"e-{name}", adapter=name, verdict=verdict, policy={}, headline={}, created_at=now))
            s.flush()
            register_step(s, row, verdict, actor="test")

    yield registry, key, adapter, tmp_path
    registry.close()


def test_lifecycle_with_two_approvers_deploy_rollback_retire(world) -> None:  # type: ignore[no-untyped-def]
    registry, key, adapter, home = world
    audit = AuditLog(home, key_file=home.parent / "audit.key")
    release, deployments = Release(registry, audit), Deployments(registry, audit)
    dev, admin = key("developer", owner="dana"), key("admin", owner="ops")
    ana, bo, dana_approver = key("approver", owner="ana"), key("approver", owner="bo"), key("approver", owner="dana")
    adapter("v1", "PASS", dev)
    adapter("v2", "FAIL", dev)
    release.set_policy(admin, "acme", 2)

    with pytest.raises(ReleaseError) as refused:
        release.approve(dana_approver, "v1")
    assert refused.value.code == "separation_of_duties"
    assert release.approve(ana, "v1").state == "evaluated"  # 1 of 2
    with pytest.raises(ReleaseError, match="approved it already"):
        release.approve(ana, "v1")
    with pytest.raises(ReleaseError, match="only an approved adapter"):
        deployments.deploy(admin, "support-bot", "v1")
    step = release.approve(bo, "v1", reason="eval passed, reviewed the report")
    assert (step.state, step.approvals, step.required) == ("approved", 2, 2)

    with pytest.raises(ReleaseError, match="override"):
        release.approve(ana, "v2")
    release.approve(ana, "v2", override="the refusal suite is stricter than our use; accepted by risk")
    final = release.approve(bo, "v2", override="agreed with ana")
    assert final.state == "approved" and final.override == "agreed with ana"

    with pytest.raises(ReleaseError) as not_admin:
        deployments.deploy(ana, "support-bot", "v1")
    assert not_admin.value.status == 403
    deployments.deploy(admin, "support-bot", "v1", reason="first release")
    assert resolve(registry, "support-bot").adapter == "v1"  # type: ignore[union-attr]
    deployments.deploy(admin, "support-bot", "v2")
    status = release.status(admin, "v1")
    assert status["state"] == "approved" and status["routes"] == []  # replaced: back to approved
    assert release.status(admin, "v2")["state"] == "deployed"
    with pytest.raises(ReleaseError, match="deployed on support-bot"):
        release.retire(admin, "v2", reason="x")

    back = deployments.rollback(admin, "support-bot", reason="complaints")
    assert back.adapter == "v1" and resolve(registry, "support-bot").adapter == "v1"  # type: ignore[union-attr]
    with pytest.raises(ReleaseError, match="no earlier deployment"):
        deployments.rollback(admin, "support-bot")  # v1 replaced nothing: the stack is empty
    release.retire(admin, "v2", reason="superseded")
    with pytest.raises(ReleaseError, match="only an approved adapter"):
        deployments.deploy(admin, "support-bot", "v2")

    actions = [(h["action"], h["to_state"]) for h in release.status(admin, "v1")["history"]]
    assert actions == [
        ("register", "draft"),
        ("evaluate", "evaluated"),
        ("approve", "evaluated"),
        ("approve", "approved"),
        ("deploy", "deployed"),
        ("undeploy", "approved"),
        ("rollback", "deployed"),
    ]
    assert [h["actor"] for h in deployments.history(admin, "support-bot")] == [f"key:{admin.id} (ops)"] * 3
    entries = AuditLog(home, key_file=home.parent / "audit.key").entries()
    done = [(e["action"], e["target"]) for e in entries if e["phase"] == "done"]
    assert ("adapter.approve", "v1") in done and ("route.rollback", "support-bot") in done
    refusals = [e for e in entries if e["phase"] == "failed"]
    assert any("separation of duties" in e["error"] for e in refusals)  # refusals are evidence too
    assert verify_audit_log(home / "audit.jsonl", key_file=home.parent / "audit.key") == []


def test_reject_ends_the_round_and_scopes_hold(world) -> None:  # type: ignore[no-untyped-def]
    registry, key, adapter, _ = world
    release, deployments = Release(registry), Deployments(registry)
    dev, ana = key("developer", owner="dana"), key("approver", owner="ana")
    other_approver, other_admin = key("approver", tenant="globex"), key("admin", tenant="globex")
    global_approver = key("approver", owner="gil", all_tenants=True)
    adapter("v1", "PASS", dev)
    adapter("pub", "PASS", dev, tenant=None)
    with pytest.raises(ReleaseError) as foreign:
        release.approve(other_approver, "v1")
    assert foreign.value.status == 404  # another tenant's adapter reads as missing
    with pytest.raises(ReleaseError) as public:
        release.approve(ana, "pub")
    assert public.value.status == 404  # a public adapter needs a key for all tenants
    assert release.approve(global_approver, "pub").state == "approved"
    with pytest.raises(ReleaseError, match="needs a reason"):
        release.reject(ana, "v1", reason=" ")
    assert release.reject(ana, "v1", reason="answers leak internal ticket ids").state == "draft"
    with pytest.raises(ReleaseError, match="no evaluation yet"):
        release.approve(ana, "v1")
    with pytest.raises(ReleaseError) as foreign_deploy:
        deployments.deploy(other_admin, "bot", "pub")
    assert foreign_deploy.value.status == 404
    with pytest.raises(ReleaseError, match="name of a model or adapter"):
        deployments.deploy(key("admin", all_tenants=True), "v1", "pub")


def test_cli_steps_act_with_a_key_and_the_same_rules(world, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from loraforge.cli import app

    registry, key, adapter, home = world
    store = KeyStore(home, registry)
    dev = key("developer", owner="dana")
    adapter("v1", "FAIL", dev)
    approver_key = store.create("acme", "approver", owner="ana")[0]
    admin_key = store.create("acme", "admin", owner="ops")[0]
    runner = CliRunner()

    def run(*args: str, key: str | None = None) -> object:
        return runner.invoke(app, [*args, "--home", str(home), *(["--key", key] if key else [])])

    monkeypatch.delenv("LORAFORGE_API_KEY", raising=False)
    missing = run("approve", "v1")
    assert "pass --key KEY or set LORAFORGE_API_KEY" in str(missing.exception)  # type: ignore[attr-defined]
    gate = run("approve", "v1", key=approver_key)
    assert "did not pass the release gate" in str(gate.exception)  # type: ignore[attr-defined]
    ok = run("approve", "v1", "--override", "known gap, tracked in RISK-12", key=approver_key)
    assert ok.exit_code == 0 and "approved although the release gate did not pass" in ok.output  # type: ignore[attr-defined]
    monkeypatch.setenv("LORAFORGE_API_KEY", admin_key)
    deployed = run("deploy", "bot", "v1", "--reason", "pilot")
    assert deployed.exit_code == 0, deployed.output  # type: ignore[attr-defined]
    nothing = run("rollback", "bot")
    assert "no earlier deployment" in str(nothing.exception)  # type: ignore[attr-defined]
    status = run("release", "status", "v1", "--json")
    assert '"state": "deployed"' in status.output and "RISK-12" in status.output  # type: ignore[attr-defined]
    routes = run("release", "routes")
    assert "bot" in routes.output and "v1" in routes.output  # type: ignore[attr-defined]
    assert run("release", "policy", "--approvals", "2").exit_code == 1  # the default policy: global keys only
    assert run("release", "policy", "--approvals", "2", "--tenant", "acme").exit_code == 0
