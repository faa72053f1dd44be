"""Pilots and monitoring over HTTP: sticky arms, end users' feedback, the report, promote and stop,
input drift on the live server."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from loraforge.data.drift import build_profile, prompt_texts
from loraforge.govern.audit import AuditLog, verify_audit_log
from loraforge.serve.adapters import AdapterStore
from loraforge.serve.keys import KeyStore
from tests.data.test_drift import OTHER_DOMAIN
from tests.serve.conftest import Running, make_adapter, start_server

SAMPLES = Path(__file__).parents[2] / "src" / "loraforge" / "samples"
USERS = 200


def _support_prompts(name: str) -> list[str]:
    lines = (SAMPLES / name).read_text().splitlines()
    return [prompt_texts((m["role"], m["content"]) for m in json.loads(line)["messages"]) for line in lines]


@pytest.fixture(scope="module")
def piloted(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("pilot-adapters")
    home = tmp_path_factory.mktemp("pilot-home")
    store = AdapterStore(home)
    for i, name in enumerate(("v1", "v2", "v3", "watched")):
        made = make_adapter(tiny_model_dir, root / name, seed=30 + i, verdict="PASS")
        if name == "watched":  # as `loraforge train` leaves it: the profile of its training prompts beside it
            build_profile(_support_prompts("support.jsonl")).write(made)
        store.add(made, name, tenant="tenant-a", created_by={"actor": "cli:dana", "key": None, "owner": "dana"})
    keys = KeyStore(home)
    extra = {
        "approver": keys.create("tenant-a", "approver", owner="ana")[0],
        "auditor": keys.create("tenant-a", "auditor")[0],
        "prod": keys.create("tenant-a", environment="production")[0],
        "prod-b": keys.create("tenant-b", environment="production")[0],
    }
    for running in start_server(home, tiny_model_dir, max_batch_size=8, monitor_window=30):
        running.keys.update(extra)
        for name in ("v1", "v2", "v3", "watched"):
            assert _post(running, "approver", f"/v1/admin/adapters/{name}/approve", {}).status_code == 200
        assert _post(running, "a-admin", "/v1/admin/routes/helpdesk/deploy", {"adapter": "v1"}).status_code == 200
        yield running


def _post(server: Running, key: str, path: str, body: dict[str, object], **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {server.keys[key]}", **headers}
    return httpx.post(server.url + path, json=body, headers=auth, timeout=60)


def _get(server: Running, key: str, path: str) -> httpx.Response:
    return httpx.get(server.url + path, headers={"Authorization": f"Bearer {server.keys[key]}"}, timeout=60)


def _ask(server: Running, model: str, user: str | None, text: str = "hello", header: bool = False) -> httpx.Response:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    if user is not None and not header:
        body["user"] = user
    extra = {"X-End-User": user} if user is not None and header else {}
    return _post(server, "prod", "/v1/chat/completions", body, **extra)


def _adapter(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["system_fingerprint"]).split(":")[0]


def test_pilot_splits_users_stickily_and_reports_the_difference(piloted: Running) -> None:
    server = piloted
    assert _post(server, "a", "/v1/admin/routes/helpdesk/pilot", {"adapter": "v2", "percent": 50}).status_code == 403
    started = _post(server, "a-admin", "/v1/admin/routes/helpdesk/pilot", {"adapter": "v2", "percent": 50})
    assert started.status_code == 200, started.text
    assert started.json() | {"pilot": 0} == {
        "route": "helpdesk",
        "pilot": 0,
        "control": "v1",
        "challenger": "v2",
        "percent": 50,
        "state": "running",
    }
    # while it runs, the route is neither deployed again nor rolled back
    refused = _post(server, "a-admin", "/v1/admin/routes/helpdesk/deploy", {"adapter": "v3"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "pilot_running"
    assert _post(server, "a-admin", "/v1/admin/routes/helpdesk/rollback", {}).status_code == 409
    again = _post(server, "a-admin", "/v1/admin/routes/helpdesk/pilot", {"adapter": "v3", "percent": 10})
    assert again.status_code == 409

    # 200 end users ask twice each (half of them name themselves with the header, half with `user`)
    def two(u: int) -> tuple[str, str, str, str]:
        user = f"user-{u}"
        first = _ask(server, "helpdesk", user, header=u % 2 == 0)
        second = _ask(server, "helpdesk", user, header=u % 2 == 1)
        return _adapter(first), _adapter(second), first.json()["id"], second.json()["id"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(two, range(USERS)))
    assert all(a == b for a, b, *_ in answers)  # a user keeps their arm
    arms = Counter(a for a, *_ in answers)
    assert set(arms) == {"v1", "v2"} and 0.4 <= arms["v2"] / USERS <= 0.6, arms

    # end users rate their answers: the challenger is liked 20 points more (0.75 against 0.55)
    rng = np.random.default_rng(11)
    for adapter, _, first, second in answers:
        p = 0.75 if adapter == "v2" else 0.55
        for rid in (first, second):
            rating = "up" if rng.random() < p else "down"
            assert _post(server, "prod", "/v1/feedback", {"id": rid, "rating": rating}).status_code == 200

    report = _get(server, "auditor", "/v1/admin/routes/helpdesk/pilot/report").json()
    control, challenger = report["arms"]["control"], report["arms"]["challenger"]
    assert control["requests"] + challenger["requests"] == 2 * USERS
    assert control["users"] + challenger["users"] == USERS
    assert control["feedback"] + challenger["feedback"] == 2 * USERS
    score = report["comparison"]["score"]
    assert score["low"] <= 0.20 <= score["high"], score
    assert score["significant"] and score["value"] > 0
    assert "scores better" in report["verdict"]
    assert control["latency_p50_s"] is not None and control["error_rate"]["value"] == 0
    assert _get(server, "a", "/v1/admin/routes/helpdesk/pilot/report").status_code == 403  # a developer key

    promoted = _post(server, "a-admin", "/v1/admin/routes/helpdesk/pilot/promote", {"reason": "users prefer v2"})
    assert promoted.json()["state"] == "promoted"
    assert {_adapter(_ask(server, "helpdesk", f"user-{u}")) for u in range(20)} == {"v2"}
    history = _get(server, "a-admin", "/v1/admin/routes/helpdesk").json()["deployments"]
    assert [d["action"] for d in history][-1] == "promote"
    assert _get(server, "a-admin", "/v1/admin/releases/v1").json()["state"] == "approved"  # no route serves it

    # a second pilot, stopped: the challenger goes back to approved and the control keeps the route
    assert (
        _post(server, "a-admin", "/v1/admin/routes/helpdesk/pilot", {"adapter": "v3", "percent": 30}).status_code == 200
    )
    assert _get(server, "a-admin", "/v1/admin/releases/v3").json()["state"] == "deployed"
    assert _post(server, "a-admin", "/v1/admin/routes/helpdesk/pilot/stop", {"reason": "no time"}).status_code == 200
    assert _get(server, "a-admin", "/v1/admin/releases/v3").json()["state"] == "approved"
    assert {_adapter(_ask(server, "helpdesk", f"user-{u}")) for u in range(10)} == {"v2"}
    pilots = _get(server, "auditor", "/v1/admin/routes/helpdesk/pilots").json()["data"]
    assert [p["state"] for p in pilots] == ["stopped", "promoted"]
    assert _post(server, "a-admin", "/v1/admin/routes/helpdesk/pilot/stop", {}).status_code == 409  # none runs

    actions = [(e["action"], e["phase"]) for e in AuditLog(server.home).entries()]
    for action in ("pilot.start", "pilot.promote", "pilot.stop"):
        assert (action, "done") in actions
    assert verify_audit_log(server.home / "audit.jsonl") == []

    metrics = _get(server, "admin", "/metrics").text
    assert re.search(r'loraforge_pilot_requests_total\{arm="challenger",route="helpdesk"\} \d+', metrics)
    assert 'loraforge_feedback_score_count{adapter="v2",model="helpdesk"}' in metrics


def test_feedback_is_the_tenants_own(piloted: Running) -> None:
    server = piloted
    answered = _ask(server, "helpdesk", "someone")
    rid = answered.json()["id"]
    assert _post(server, "prod-b", "/v1/feedback", {"id": rid, "rating": "up"}).status_code == 404
    assert _post(server, "prod", "/v1/feedback", {"id": "chatcmpl-nope", "rating": "up"}).status_code == 404
    bad = _post(server, "prod", "/v1/feedback", {"id": rid, "rating": 7})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_rating"
    assert _post(server, "prod", "/v1/feedback", {"id": rid, "rating": True}).status_code == 400
    first = _post(server, "prod", "/v1/feedback", {"id": rid, "rating": 5, "comment": "spot on"}).json()
    assert first["score"] == 1.0 and not first["replaced"]
    second = _post(server, "prod", "/v1/feedback", {"id": rid, "rating": 2}).json()
    assert second["score"] == 0.25 and second["replaced"]
    assert _post(server, "auditor", "/v1/feedback", {"id": rid, "rating": "up"}).status_code == 403


def test_monitor_shows_drift_on_the_live_server(piloted: Running) -> None:
    server = piloted
    assert _post(server, "a-admin", "/v1/admin/routes/support/deploy", {"adapter": "watched"}).status_code == 200
    held = _support_prompts("support_holdout.jsonl")
    for text in held:
        assert _ask(server, "support", "x", text).status_code == 200
    metrics = _get(server, "admin", "/metrics").text
    assert 'loraforge_input_drift_alert{adapter="watched"} 0.0' in metrics
    calm = _get(server, "auditor", "/v1/admin/monitor/support?since=3600&bucket=600").json()
    assert calm["total"]["requests"] == len(held) and calm["drift"]["watched"]["alert"] is False
    assert not [a for a in calm["alerts"] if a["kind"] == "input_drift"]

    for text in OTHER_DOMAIN[:30]:  # users start asking about something else
        assert _ask(server, "support", "x", text).status_code == 200
    metrics = _get(server, "admin", "/metrics").text
    assert 'loraforge_input_drift_alert{adapter="watched"} 1.0' in metrics
    moved = _get(server, "auditor", "/v1/admin/monitor/support?since=3600&bucket=600").json()
    assert moved["drift"]["watched"]["alert"] is True
    assert [a["adapter"] for a in moved["alerts"] if a["kind"] == "input_drift"] == ["watched"]
    assert len(moved["buckets"]) == 6 and sum(b["requests"] for b in moved["buckets"]) == len(held) + 30
    assert moved["adapters"]["watched"]["unfamiliar_share"]["value"] > 0.1
    assert _get(server, "a", "/v1/admin/monitor/support").status_code == 403
    assert _get(server, "auditor", "/v1/admin/monitor/nothing-here").status_code == 404
    assert _get(server, "auditor", "/v1/admin/monitor/support?since=3600&bucket=1").status_code == 400
    # the routes' monitoring before it: requests from the pilot test are there too
    helpdesk = _get(server, "auditor", "/v1/admin/monitor/helpdesk").json()
    assert helpdesk["total"]["requests"] >= 2 * USERS and set(helpdesk["adapters"]) >= {"v1", "v2"}
