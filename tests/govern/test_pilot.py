"""Pilots and monitoring on a registry: the rules of a pilot, the arms' split, the monitoring
summary's buckets and alerts, and the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from loraforge.errors import ReleaseError
from loraforge.govern.deploy import CHALLENGER, Deployments, resolve
from loraforge.govern.monitor import summary
from loraforge.govern.pilot import Pilots, user_hash
from loraforge.govern.release import Release
from loraforge.serve.usage import UsageLedger
from tests.govern.test_release import world  # noqa: F401  (the fixture)

SAMPLES = Path(__file__).parents[2] / "src" / "loraforge" / "samples"


def _ready(world):  # type: ignore[no-untyped-def]  # noqa: F811
    registry, key, adapter, _ = world
    dev, ana, admin = key("developer", owner="dana"), key("approver", owner="ana"), key("admin", owner="ops")
    release, deployments = Release(registry), Deployments(registry)
    for name in ("v1", "v2", "v3"):
        adapter(name, "PASS", dev)
        release.approve(ana, name)
    adapter("draft", None, dev)
    deployments.deploy(admin, "bot", "v1")
    return registry, key, release, deployments, Pilots(deployments), admin, ana


def test_pilot_rules_split_and_promote(world) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    registry, key, release, deployments, pilots, admin, ana = _ready(world)
    _, _, adapter, _ = world
    adapter("theirs", "PASS", key("developer", tenant="globex"), tenant="globex")

    def refused(code: str, *args: object, who=admin) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(ReleaseError) as e:
            pilots.start(who, *args)  # type: ignore[arg-type]
        assert e.value.code == code, e.value

    refused("admin_required", "bot", "v2", 10, who=ana)
    refused("bad_percent", "bot", "v2", 0)
    refused("bad_percent", "bot", "v2", 100)
    refused("route_not_found", "nowhere", "v2", 10)
    refused("not_approved", "bot", "draft", 10)
    refused("already_deployed", "bot", "v1", 10)
    refused("adapter_not_found", "bot", "theirs", 10)

    step = pilots.start(admin, "bot", "v2", 30, reason="try the shorter answers")
    assert (step.control, step.challenger, step.state) == ("v1", "v2", "running")
    assert release.status(admin, "v2")["state"] == "deployed"
    refused("pilot_running", "bot", "v3", 10)
    binding = resolve(registry, "bot")
    assert binding is not None and binding.pilot is not None
    users = [user_hash("acme", f"u{i}") for i in range(4000)]
    arms = [binding.choose(u) for u in users]
    share = sum(1 for _, arm in arms if arm == CHALLENGER) / len(users)
    assert 0.27 <= share <= 0.33, share
    assert all(binding.choose(u) == a for u, a in zip(users[:200], arms[:200], strict=True))  # sticky
    assert {adapter for adapter, arm in arms if arm == CHALLENGER} == {"v2"}

    for step_call in (
        lambda: deployments.deploy(admin, "bot", "v3"),
        lambda: deployments.rollback(admin, "bot"),
        lambda: release.retire(admin, "v2", reason="x"),  # it serves the pilot
    ):
        with pytest.raises(ReleaseError, match=r"pilot|deployed on bot"):
            step_call()

    pilots.promote(admin, "bot", reason="users prefer it")
    after = resolve(registry, "bot")
    assert after is not None and after.adapter == "v2" and after.pilot is None
    assert release.status(admin, "v1")["state"] == "approved"
    assert [d["action"] for d in deployments.history(admin, "bot")][-1] == "promote"
    assert deployments.rollback(admin, "bot", reason="undo the promotion").adapter == "v1"

    pilots.start(admin, "bot", "v3", 50)
    pilots.stop(admin, "bot", reason="not now")
    assert release.status(admin, "v3")["state"] == "approved"
    assert [p["state"] for p in pilots.list(admin, "bot")] == ["stopped", "promoted"]
    with pytest.raises(ReleaseError, match="no pilot"):
        pilots.stop(admin, "bot")
    with pytest.raises(ReleaseError) as forbidden:
        pilots.report(key("developer"), "bot")
    assert forbidden.value.status == 403


def _record(ledger: UsageLedger, ts: float, n: int, **fields: object) -> None:
    for i in range(n):
        ledger.record(
            request_id=f"r{ts}-{i}-{fields}",
            tenant="acme",
            key_id="k",
            model="bot",
            prompt_tokens=10,
            completion_tokens=5,
            route="bot",
            adapter="v1",
            latency_s=0.2,
            **fields,
        )
        with ledger.registry.session() as s:  # the ledger stamps "now"; this history is in the past
            from sqlalchemy import update

            from loraforge.registry.schema import UsageRecord

            s.execute(update(UsageRecord).where(UsageRecord.request_id == f"r{ts}-{i}-{fields}").values(ts=ts))


def test_monitor_buckets_and_alerts(world) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    registry, key, _, _, _, admin, _ = _ready(world)
    ledger = UsageLedger(Path("unused"), price_prompt_1k=1.0, price_completion_1k=2.0, registry=registry)
    now = time.time()
    hour = now - 3600
    _record(ledger, hour - 1800, 40, status=200, refusal=False, unfamiliar=False)  # a calm first hour
    _record(ledger, hour + 600, 25, status=200, refusal=True, unfamiliar=True)  # then it refuses, and drifts
    _record(ledger, hour + 700, 15, status=200, refusal=False, unfamiliar=False)
    _record(ledger, hour + 800, 20, status=503)
    result = summary(registry, admin, "bot", since_s=7200, bucket_s=3600, now=now)
    assert [b["requests"] for b in result["buckets"]] == [40, 60]
    total = result["total"]
    assert total["requests"] == 100 and total["error_rate"]["value"] == pytest.approx(0.2)
    assert total["cost"] == pytest.approx(100 * (0.01 + 0.01))
    assert result["buckets"][1]["refusal_rate"]["value"] == pytest.approx(25 / 40)
    assert result["drift"]["v1"]["alert"] and result["drift"]["v1"]["prompts"] == 50
    assert {a["kind"] for a in result["alerts"]} == {"errors", "refusals", "input_drift"}
    calm = summary(registry, admin, "bot", since_s=3600, bucket_s=3600, now=hour)
    assert calm["total"]["requests"] == 40 and {a["kind"] for a in calm["alerts"]} == {"input_drift"}  # drift: latest
    with pytest.raises(ReleaseError) as e:
        summary(registry, key("developer"), "bot")
    assert e.value.status == 403
    with pytest.raises(ReleaseError, match="at most 500 buckets"):
        summary(registry, admin, "bot", since_s=86400, bucket_s=60)
    with pytest.raises(ReleaseError) as missing:
        summary(registry, key("auditor", tenant="globex"), "bot")
    assert missing.value.status == 404
    by_adapter = summary(registry, key("auditor"), "v1", since_s=7200, bucket_s=600, now=now)
    assert by_adapter["kind"] == "adapter" and by_adapter["total"]["requests"] == 100


def test_cli_pilot_and_monitor(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from typer.testing import CliRunner

    from loraforge.cli import app
    from loraforge.serve.keys import KeyStore

    registry, _, _, home = world
    _ready(world)
    store = KeyStore(home, registry)
    admin_key = store.create("acme", "admin", owner="ops2")[0]
    auditor_key = store.create("acme", "auditor")[0]
    runner = CliRunner()

    def run(*args: str) -> object:
        return runner.invoke(app, [*args, "--home", str(home)])

    monkeypatch.setenv("LORAFORGE_API_KEY", admin_key)
    started = run("pilot", "start", "bot", "v2", "--percent", "20", "--reason", "shorter answers")
    assert started.exit_code == 0 and "20% of end users get v2" in started.output, started.output  # type: ignore[attr-defined]
    listed = run("pilot", "list", "bot", "--json")
    assert json.loads(listed.output)[0]["state"] == "running"  # type: ignore[attr-defined]
    monkeypatch.setenv("LORAFORGE_API_KEY", auditor_key)
    report = run("pilot", "report", "bot")
    assert report.exit_code == 0 and "No feedback in one of the arms yet" in report.output, report.output  # type: ignore[attr-defined]
    assert run("pilot", "promote", "bot").exit_code == 1  # an auditor's key reads only
    shown = run("monitor", "bot", "--since", "2h", "--bucket", "30m")
    assert shown.exit_code == 0 and "0 requests" in shown.output, shown.output  # type: ignore[attr-defined]
    bad = run("monitor", "bot", "--since", "soon")
    assert "not a duration" in str(bad.exception)  # type: ignore[attr-defined]
    monkeypatch.setenv("LORAFORGE_API_KEY", admin_key)
    assert run("pilot", "promote", "bot", "--reason", "fine").exit_code == 0

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    profiled = runner.invoke(app, ["adapters", "profile", str(adapter_dir), "--data", str(SAMPLES / "support.jsonl")])
    assert profiled.exit_code == 0 and "220 prompts" in profiled.output, profiled.output
    assert (adapter_dir / "input_profile.json").is_file()
