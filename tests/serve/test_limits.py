"""Rate limits, cancellation and a bounded load test on loopback."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest

from loraforge.serve.usage import UsageLedger
from tests.serve.conftest import start_server


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("limited-home")
    yield from start_server(home, tiny_model_dir, requests_per_minute=3, tokens_per_minute=300, max_context_tokens=512)


def _chat(server, key: str = "a", max_tokens: int = 2, **extra: object) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": server.engine.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {server.keys[key]}"}
    return httpx.post(server.url + "/v1/chat/completions", json={**body, **extra}, headers=headers, timeout=60)


def test_requests_per_minute_gives_429_with_retry_after(limited) -> None:  # type: ignore[no-untyped-def]
    statuses = [_chat(limited, "b").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = _chat(limited, "b")
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert _chat(limited, "a").status_code == 200  # limits are per key


def test_max_context_tokens(limited) -> None:  # type: ignore[no-untyped-def]
    r = _chat(limited, "admin", max_tokens=600)
    assert r.status_code == 400 and "maximum context length is 512 tokens" in r.json()["error"]["message"]


def test_tokens_per_minute(limited) -> None:  # type: ignore[no-untyped-def]
    r = _chat(limited, "admin", max_tokens=400)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]


def test_cancelled_stream_frees_its_slot(server) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {server.keys['a']}"}
    # The tiny base model repeats its last token: it would run all 1800 tokens if not cancelled.
    body = {
        "model": server.engine.model_id,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 1800,
        "stream": True,
        "user": "cancel-test",
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 10
    while server.engine.stats()["batch_size"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.stats()["batch_size"] == 0
    time.sleep(0.2)
    ledger = UsageLedger(server.home, price_prompt_1k=0, price_completion_1k=0)
    last = ledger.entries("tenant-a", limit=1)[0]
    assert last["model"] == server.engine.model_id and last["completion_tokens"] < 1800


def test_load_64_clients_no_5xx(server) -> None:  # type: ignore[no-untyped-def]
    """64 concurrent clients for 20 s: every request is answered or rate-limited, never a 5xx."""
    statuses: list[int] = []
    rng = random.Random(0)
    models = {"a": ["a1", "a2", "p1"], "b": ["b1", "p1"], "admin": ["p1", server.engine.model_id]}

    async def client(i: int, stop_at: float) -> None:
        key = ("a", "b", "admin")[i % 3]
        headers = {"Authorization": f"Bearer {server.keys[key]}"}
        async with httpx.AsyncClient(timeout=120) as http:
            while time.time() < stop_at:
                body = {
                    "model": rng.choice(models[key]),
                    "messages": [{"role": "user", "content": "hello " * rng.randrange(1, 20)}],
                    "max_tokens": rng.randrange(1, 24),
                    "stream": rng.random() < 0.3,
                }
                r = await http.post(server.url + "/v1/chat/completions", json=body, headers=headers)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    await asyncio.sleep(min(float(r.headers.get("Retry-After", "1")), 1.0))

    async def main() -> None:
        stop_at = time.time() + 20
        await asyncio.gather(*(client(i, stop_at) for i in range(64)))

    asyncio.run(main())
    assert statuses and all(s in (200, 429) for s in statuses), sorted(set(statuses))
    assert statuses.count(200) >= 64
