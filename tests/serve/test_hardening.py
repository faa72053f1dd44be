"""What one tenant's worst requests get: a clear 4xx (or 503), never a 500, and nothing of anyone else's."""

from __future__ import annotations

import json
import socket
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import start_server


def _post(server, path: str, body: Any, key: str = "a", **kwargs: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {server.keys[key]}", **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


def _chat(server, **extra: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {"model": server.engine.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}


@pytest.mark.parametrize(
    ("extra", "status", "says"),
    [
        ({"temperature": 1e-300}, 200, None),
        ({"temperature": 5e-38, "n": 3}, 200, None),
        ({"seed": 2**63 - 1, "temperature": 1.0, "n": 4}, 200, None),
        ({"seed": 2**64}, 400, "seed"),
        ({"seed": -1}, 400, "seed"),
        ({"stop": ["a"] * 5}, 400, "at most 4 stop sequences"),
        ({"stop": "x" * 257}, 400, "at most 256 characters"),
        ({"stop": ["ok", "y" * 300]}, 400, "at most 256 characters"),
        ({"temperature": float("nan")}, 400, "temperature"),
        ({"max_tokens": 10**30}, 400, "maximum context length"),
    ],
)
def test_hostile_sampling_parameters(server, extra: dict[str, Any], status: int, says: str | None) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps(_chat(server, **extra), allow_nan=True)  # NaN: what a careless client can send
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {server.keys['a']}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    if says:
        assert says in r.json()["error"]["message"]
    assert server.engine.alive()


def test_too_many_prompts_in_one_completion_request(server) -> None:  # type: ignore[no-untyped-def]
    batch = server.engine.max_batch_size
    r = _post(server, "/v1/completions", {"model": "a1", "prompt": [[1, 2]] * (batch + 1), "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts"
    r = _post(server, "/v1/completions", {"model": "a1", "prompt": [[1, 2]] * (batch // 2 + 1), "n": 2})
    assert r.status_code == 400 and "max_batch_size" in r.json()["error"]["message"]
    ok = _post(server, "/v1/completions", {"model": "a1", "prompt": [[1, 2]] * batch, "max_tokens": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == batch


def test_echo_with_logprobs_is_capped(server) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(100, 100 + 1100))
    body = {"model": "a1", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "echo_prompt_too_long"
    assert "1024" in r.json()["error"]["message"] and "1100" in r.json()["error"]["message"]


def test_an_oversized_chunked_body_is_413(server) -> None:  # type: ignore[no-untyped-def]
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(1200):
            yield b"x" * 1000
        yield b'"}]}'

    headers = {"Authorization": f"Bearer {server.keys['a']}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=headers, timeout=60)
    assert "content-length" not in r.request.headers  # it was sent chunked
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_a_non_streaming_request_is_cancelled_when_its_client_leaves(server) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps(_chat(server, max_tokens=1500, min_tokens=1500)).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.keys['b']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(request)
        deadline = time.time() + 30
        while not server.engine.stats()["batch_size"]:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.01)
    # The client is gone: its row leaves the batch long before its 1,500 tokens would be done.
    deadline = time.time() + 30
    while server.engine.stats()["batch_size"]:
        assert time.time() < deadline, "the abandoned request kept running"
        time.sleep(0.02)


def test_errors_carry_no_paths_of_the_server(server, adapter_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from loraforge.serve.adapters import AdapterStore

    store = AdapterStore(server.home)
    store.add(adapter_dirs["a2"], "fragile", tenant="tenant-a")
    (server.home / "adapters" / "fragile" / "adapter_model.safetensors").unlink()
    try:
        r = _post(server, "/v1/chat/completions", {**_chat(server), "model": "fragile"})
    finally:
        store.remove("fragile")  # the server is shared with other tests
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "adapter_model.safetensors is missing" in message
    assert str(server.home) not in message and "/" not in message.split("served: ")[1]


@pytest.mark.parametrize(
    ("key", "method", "path", "body", "status"),
    [
        ("a-admin", "get", "/metrics", None, 403),
        ("a-admin", "get", "/v1/usage?tenant=tenant-b", None, 403),
        ("a-admin", "post", "/v1/admin/adapters/load", {"name": "b1"}, 404),
        ("a-admin", "post", "/v1/admin/adapters/unload", {"name": "b1"}, 404),
        ("a-admin", "post", "/v1/admin/adapters/load", {"name": "a1"}, 200),
        ("a-admin", "post", "/v1/admin/adapters/load", {"name": "p1"}, 200),
        ("a-admin", "get", "/v1/usage", None, 200),
        ("admin", "get", "/metrics", None, 200),
        ("admin", "get", "/v1/usage?tenant=tenant-b", None, 200),
        ("admin", "post", "/v1/admin/adapters/load", {"name": "b1"}, 200),
    ],
)
def test_admin_keys_are_scoped_to_their_tenant_unless_global(  # type: ignore[no-untyped-def]
    server, key: str, method: str, path: str, body: Any, status: int
) -> None:
    headers = {"Authorization": f"Bearer {server.keys[key]}"}
    r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text


def test_a_tenant_admin_lists_only_its_tenants_and_public_adapters(server) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {server.keys['a-admin']}"}
    names = {a["name"] for a in httpx.get(server.url + "/v1/admin/adapters", headers=headers).json()["data"]}
    assert {"a1", "a2", "p1"} <= names and "b1" not in names


def test_governance_metadata_is_shown_to_admins_only(server) -> None:  # type: ignore[no-untyped-def]
    def card(key: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {server.keys[key]}"}
        return dict(httpx.get(server.url + "/v1/models/p1", headers=headers).json())

    assert "governance_flags" not in card("a") and "governance_override" not in card("a")
    assert card("admin")["governance_flags"] == [] and card("admin")["governance_override"] is None


def test_a_revocation_by_another_process_is_noticed_at_the_next_request(tmp_path: Path) -> None:
    from loraforge.registry.database import open_registry
    from loraforge.serve.keys import KeyStore

    store = KeyStore(tmp_path)
    key, record = store.create("acme")
    assert store.authenticate(key) is not None
    other = open_registry(tmp_path)  # a connection of its own, as another process has
    try:
        KeyStore(tmp_path, other).revoke(record.id)
    finally:
        other.close()
    assert store.authenticate(key) is None


@pytest.mark.parametrize("name", ["acme\n", "acme\n\n", " acme", "ac/me", "", "a" * 65, ".hidden"])
def test_names_are_matched_in_full(tmp_path: Path, adapter_dirs, name: str) -> None:  # type: ignore[no-untyped-def]
    from loraforge.errors import ConfigError
    from loraforge.serve.adapters import AdapterStore
    from loraforge.serve.keys import KeyStore

    with pytest.raises(ConfigError, match="not allowed"):
        KeyStore(tmp_path).create(name)
    with pytest.raises(ConfigError, match="not allowed"):
        AdapterStore(tmp_path).add(adapter_dirs["a1"], name, tenant="acme")
    with pytest.raises(ConfigError, match="not allowed"):
        AdapterStore(tmp_path).add(adapter_dirs["a1"], "fine", tenant=name)


def test_state_in_the_home_is_private(server) -> None:  # type: ignore[no-untyped-def]
    assert _post(server, "/v1/chat/completions", _chat(server)).status_code == 200
    home = server.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    checked = 0
    for path in home.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {oct(mode)}"
        checked += 1
    for name in ("registry.db", "audit.jsonl", "adapters/a1/adapter_model.safetensors"):
        assert (home / name).is_file()
    assert checked > 10


def test_a_small_kv_budget_refuses_long_work_with_503(tmp_path: Path, tiny_model_dir: Path) -> None:
    from loraforge.errors import ConfigError
    from loraforge.serve.config import ServeConfig
    from loraforge.serve.server import build_server

    with pytest.raises(ConfigError, match="kv_cache_mb"):
        build_server(ServeConfig(base_model=str(tiny_model_dir), kv_cache_mb=1, max_batch_size=64), tmp_path / "h0")
    # The tiny model takes 256 (bf16) or 512 (fp32) bytes per position: 1 MB holds 512 or 256
    # positions for each of 8 slots, less than its context of 2,048.
    gen = start_server(tmp_path / "home", tiny_model_dir, kv_cache_mb=1, max_batch_size=8)
    server = next(gen)
    try:
        per_position = server.engine.runner.kv_bytes_per_position
        assert server.engine.kv_positions == 2**20 // (8 * per_position) < server.engine.context_length
        r = _post(server, "/v1/chat/completions", _chat(server, max_tokens=600))
        assert r.status_code == 503 and r.json()["error"]["code"] == "kv_budget_exceeded"
        assert int(r.headers["Retry-After"]) >= 1
        assert _post(server, "/v1/chat/completions", _chat(server, max_tokens=20)).status_code == 200
    finally:
        gen.close()


def test_a_dead_engine_gives_503_at_once_and_ready_says_so(tmp_path: Path, tiny_model_dir: Path) -> None:
    import threading

    import uvicorn

    from loraforge.serve.config import ServeConfig
    from loraforge.serve.keys import KeyStore
    from loraforge.serve.server import build_server
    from tests.serve.conftest import free_port

    died = threading.Event()
    key = KeyStore(tmp_path).create("acme")[0]
    config = ServeConfig(base_model=str(tiny_model_dir), port=free_port())
    server = build_server(config, tmp_path, on_engine_death=lambda e: died.set())
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=config.port, log_config=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{config.port}"

        def crash() -> bool:
            raise RuntimeError("a bug in the loop")

        server.engine._loop_once = crash  # type: ignore[method-assign]
        server.engine.call(lambda: None)  # wakes the thread: its next pass dies
        assert died.wait(10)
        started = time.perf_counter()
        body = {"model": server.engine.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
        assert time.perf_counter() - started < 10  # at once, not after request_timeout_s (300 s)
        assert httpx.get(url + "/ready").status_code == 503
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        server.engine.close()
