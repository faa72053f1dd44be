"""Tenant isolation on every endpoint, key roles, admin endpoints, usage and metrics."""

from __future__ import annotations

import httpx
import pytest

from loraforge.govern.audit import AuditLog, verify_audit_log

MODELS = ("a1", "b1", "p1", "nope")
# What each tenant may use: its own adapters and public ones; the rest is one and the same 404.
VISIBLE = {"a": {"a1", "a2", "p1"}, "b": {"b1", "p1"}, "admin": {"p1"}}


def _call(server, key: str, endpoint: str, model: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {server.keys[key]}"}
    if endpoint == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    if endpoint == "completions":
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        return httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
    return httpx.get(server.url + f"/v1/models/{model}", headers=headers, timeout=60)


@pytest.mark.parametrize("endpoint", ["chat", "completions", "model"])
@pytest.mark.parametrize("key", ["a", "b", "admin"])
def test_isolation_matrix(server, key: str, endpoint: str) -> None:  # type: ignore[no-untyped-def]
    not_found = []
    for model in MODELS:
        r = _call(server, key, endpoint, model)
        if model in VISIBLE[key]:
            assert r.status_code == 200, (key, endpoint, model, r.text)
        else:
            assert r.status_code == 404, (key, endpoint, model, r.text)
            not_found.append(r.json()["error"]["message"].replace(model, "MODEL"))
    assert len(set(not_found)) == 1  # a foreign adapter reads exactly like a missing one


def test_models_list_per_tenant(server) -> None:  # type: ignore[no-untyped-def]
    for key, visible in VISIBLE.items():
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {server.keys[key]}"})
        assert {m["id"] for m in r.json()["data"]} == visible | {server.engine.model_id}


def test_admin_endpoints_need_the_admin_role(server) -> None:  # type: ignore[no-untyped-def]
    def post(key: str | None, path: str, name: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {server.keys[key]}"} if key else {}
        return httpx.post(server.url + path, json={"name": name}, headers=headers, timeout=60)

    assert post(None, "/v1/admin/adapters/load", "b1").status_code == 401
    assert post("a", "/v1/admin/adapters/load", "b1").status_code == 403
    assert post("admin", "/v1/admin/adapters/load", "b1").json() == {"name": "b1", "loaded": True}
    listing = httpx.get(server.url + "/v1/admin/adapters", headers={"Authorization": f"Bearer {server.keys['admin']}"})
    assert {a["name"]: a["loaded"] for a in listing.json()["data"]}["b1"] is True
    assert post("admin", "/v1/admin/adapters/unload", "b1").status_code == 200
    assert post("admin", "/v1/admin/adapters/unload", "b1").status_code == 404
    actions = [e["action"] for e in AuditLog(server.home).entries()]
    assert "adapter.load" in actions and "adapter.unload" in actions
    assert verify_audit_log(server.home / "audit.jsonl") == []


def test_metrics_need_admin_and_count_tokens_per_tenant(server) -> None:  # type: ignore[no-untyped-def]
    _call(server, "a", "chat", "a1")
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert (
        httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.keys['a']}"}).status_code == 403
    )
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.keys['admin']}"}).text
    assert 'loraforge_completion_tokens_total{model="a1",tenant="tenant-a"}' in text
    for name in ("request_latency_seconds", "time_to_first_token_seconds", "queue_depth", "batch_size", "errors"):
        assert f"loraforge_{name}" in text


def test_usage_is_per_tenant(server) -> None:  # type: ignore[no-untyped-def]
    _call(server, "b", "chat", "b1")
    headers = {"Authorization": f"Bearer {server.keys['b']}"}
    usage = httpx.get(server.url + "/v1/usage", headers=headers).json()
    assert usage["tenant"] == "tenant-b" and usage["total"]["requests"] >= 1
    assert set(usage["by_model"]) <= {"b1", "p1", server.engine.model_id}
    assert httpx.get(server.url + "/v1/usage?tenant=tenant-a", headers=headers).status_code == 403
    admin = {"Authorization": f"Bearer {server.keys['admin']}"}
    assert httpx.get(server.url + "/v1/usage?tenant=tenant-a", headers=admin).json()["tenant"] == "tenant-a"


def test_revoked_key_is_refused_without_restart(server) -> None:  # type: ignore[no-untyped-def]
    from loraforge.serve.keys import KeyStore

    store = KeyStore(server.home)
    key, record = store.create("tenant-a")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200
    store.revoke(record.id)
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
    stored = b"".join(p.read_bytes() for p in server.home.glob("registry.db*"))
    assert key.encode() not in stored and record.hash.encode() in stored  # only hashes are stored


def test_body_size_limit(server) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {server.keys['a']}"}
    body = {"model": "a1", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
