"""Release governance over HTTP: roles, approvals, routes, production keys, and a rollback under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraforge.govern.audit import AuditLog, verify_audit_log
from loraforge.serve.adapters import AdapterStore
from loraforge.serve.keys import KeyStore
from tests.serve.conftest import Running, make_adapter, start_server


@pytest.fixture(scope="module")
def governed(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[Running, dict[str, str]]]:
    root = tmp_path_factory.mktemp("release-adapters")
    home = tmp_path_factory.mktemp("release-home")
    store = AdapterStore(home)
    for i, (name, verdict) in enumerate((("r1", "PASS"), ("r2", "PASS"), ("bad", "FAIL"), ("raw", None))):
        made = make_adapter(tiny_model_dir, root / name, seed=10 + i, verdict=verdict)
        store.add(made, name, tenant="tenant-a", created_by={"actor": "cli:dana", "key": None, "owner": "dana"})
    keys = KeyStore(home)
    extra = {
        "approver": keys.create("tenant-a", "approver", owner="ana")[0],
        "dana-approver": keys.create("tenant-a", "approver", owner="dana")[0],
        "auditor": keys.create("tenant-a", "auditor")[0],
        "prod": keys.create("tenant-a", environment="production")[0],
        "prod-b": keys.create("tenant-b", environment="production")[0],
    }
    for running in start_server(home, tiny_model_dir, max_batch_size=8):
        running.keys.update(extra)
        yield running, extra


def _post(server: Running, key: str, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {server.keys[key]}"}, timeout=60)


def _chat(server: Running, key: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0}
    return _post(server, key, "/v1/chat/completions", body)


def test_roles_and_gate_over_http(governed) -> None:  # type: ignore[no-untyped-def]
    server, _ = governed
    assert _post(server, "a", "/v1/admin/adapters/r1/approve", {}).status_code == 403  # a developer key
    assert _post(server, "a-admin", "/v1/admin/adapters/r1/approve", {}).json()["error"]["code"] == "approver_required"
    sod = _post(server, "dana-approver", "/v1/admin/adapters/r1/approve", {})
    assert sod.status_code == 403 and sod.json()["error"]["code"] == "separation_of_duties"
    assert _post(server, "approver", "/v1/admin/adapters/raw/approve", {}).status_code == 409  # never evaluated
    gate = _post(server, "approver", "/v1/admin/adapters/bad/approve", {"reason": "looks fine"})
    assert gate.status_code == 400 and gate.json()["error"]["code"] == "gate_override_required"
    over = _post(server, "approver", "/v1/admin/adapters/bad/approve", {"override": "accepted regression"})
    assert over.json()["state"] == "approved" and over.json()["release_override"] == "accepted regression"
    assert _post(server, "b", "/v1/admin/adapters/r1/approve", {}).status_code == 403
    # the override is shown wherever the adapter is: the model list of the tenant's keys
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {server.keys['a']}"}).json()
    assert {m["id"]: m.get("release_override") for m in models["data"]}["bad"] == "accepted regression"
    auditor = _chat(server, "auditor", "r1")
    assert auditor.status_code == 403 and auditor.json()["error"]["code"] == "read_only_key"
    status = httpx.get(
        server.url + "/v1/admin/releases/bad", headers={"Authorization": f"Bearer {server.keys['auditor']}"}
    ).json()
    assert status["state"] == "approved" and [h["action"] for h in status["history"]][-1] == "approve"


def test_deploy_then_rollback_under_load(governed) -> None:  # type: ignore[no-untyped-def]
    server, _ = governed
    for name in ("r1", "r2"):
        assert (
            _post(server, "approver", f"/v1/admin/adapters/{name}/approve", {"reason": "gate passed"}).status_code
            == 200
        )
    assert _post(server, "a-admin", "/v1/admin/routes/bot/deploy", {"adapter": "r1"}).json()["adapter"] == "r1"
    assert _post(server, "a-admin", "/v1/admin/routes/bot/deploy", {"adapter": "r2", "reason": "v2"}).status_code == 200

    # production keys: the route only — not the adapter's own name, not the base model, not another tenant's route
    assert _chat(server, "prod", "r2").status_code == 404
    assert _chat(server, "prod", server.engine.model_id).status_code == 404
    assert _chat(server, "prod-b", "bot").status_code == 404
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {server.keys['prod']}"}).json()
    assert [m["id"] for m in models["data"]] == ["bot"]

    results: list[tuple[float, float, int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            r = _chat(server, "prod", "bot")
            fingerprint = r.json().get("system_fingerprint") if r.status_code == 200 else r.text
            results.append((started, time.monotonic(), r.status_code, fingerprint))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    while len(results) < 12:
        time.sleep(0.05)
    began = time.monotonic()
    rolled = _post(server, "a-admin", "/v1/admin/routes/bot/rollback", {"reason": "complaints about v2"})
    ended = time.monotonic()
    assert rolled.status_code == 200 and rolled.json()["adapter"] == "r1"
    count = len(results)
    while len(results) < count + 12:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    assert all(status == 200 for _, _, status, _ in results), [r for r in results if r[2] != 200]
    before = {fp for start, end, _, fp in results if end < began}
    after = {fp for start, _, _, fp in results if start > ended}
    assert len(before) == 1 and next(iter(before)).startswith("r2:")  # type: ignore[union-attr]
    assert len(after) == 1 and next(iter(after)).startswith("r1:")  # type: ignore[union-attr]
    history = httpx.get(
        server.url + "/v1/admin/routes/bot", headers={"Authorization": f"Bearer {server.keys['a-admin']}"}
    ).json()
    assert [d["action"] for d in history["deployments"]] == ["deploy", "deploy", "rollback"]
    actions = [(e["action"], e["phase"]) for e in AuditLog(server.home).entries()]
    assert ("route.rollback", "done") in actions and ("adapter.approve", "failed") in actions
    assert verify_audit_log(server.home / "audit.jsonl") == []
    # retiring a deployed adapter is refused; after it is replaced, retired ones are never served
    assert _post(server, "a-admin", "/v1/admin/adapters/r1/retire", {"reason": "x"}).status_code == 409
    assert _post(server, "a-admin", "/v1/admin/adapters/r2/retire", {"reason": "superseded"}).status_code == 200
    assert _chat(server, "a", "r2").status_code == 404


def test_documents_for_admins_approvers_and_auditors_only(governed) -> None:  # type: ignore[no-untyped-def]
    server, _ = governed

    def get(key: str, query: str, name: str = "r1") -> httpx.Response:
        headers = {"Authorization": f"Bearer {server.keys[key]}"}
        return httpx.get(f"{server.url}/v1/admin/adapters/{name}/report?{query}", headers=headers, timeout=60)

    compliance = get("auditor", "document=compliance&format=json")
    assert compliance.status_code == 200, compliance.text
    open_items = {o["id"] for o in compliance.json()["open_items"]}
    assert "guardrail_policy" in open_items and "monitoring" not in open_items  # r1 served requests above
    never_served = get("auditor", "document=compliance&format=json", name="raw").json()
    assert "monitoring" in {o["id"] for o in never_served["open_items"]}
    page = get("a-admin", "document=model_card&format=html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Model card: r1" in page.text
    assert get("a", "document=compliance").status_code == 403  # a developer key
    assert get("auditor", "document=compliance", name="nope").status_code == 404
    assert get("admin", "document=nonsense").status_code == 400
