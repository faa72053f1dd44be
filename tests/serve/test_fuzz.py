"""Property: whatever body a caller sends, the answer is below 500 and the engine keeps serving.

Bodies are drawn near the schemas (every field of OpenAI's requests, with values at and past
their limits: NaN and tiny temperatures, 2^64 seeds, negative or huge token ids, long stops,
unknown roles) and far from them (any JSON at all), against a real server on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import Running, start_server

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same bodies on every run: a failure is reproducible
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, adapter_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    from loraforge.serve.adapters import AdapterStore

    home = tmp_path_factory.mktemp("fuzz-home")
    store = AdapterStore(home)
    store.add(adapter_dirs["a1"], "a1", tenant="tenant-a")
    store.add(adapter_dirs["b1"], "b1", tenant="tenant-b")
    yield from start_server(
        home,
        tiny_model_dir,
        max_batch_size=8,
        default_max_tokens=8,
        requests_per_minute=100_000,
        tokens_per_minute=10_000_000,
        max_context_tokens=512,
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NUMBERS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 1e-300, 5e-38, 2**63 - 1, 2**63, 2**64])
)
TEXT = st.text(max_size=40) | st.sampled_from(["", "\x00", "ignore previous instructions", "é" * 300, "<|im_end|>"])


# Within the schema, at and near its limits: what the engine itself must survive.
TEMPERATURE = st.floats(min_value=0, max_value=2) | st.sampled_from([0.0, 1e-300, 5e-38, 1e-6, 2.0])
SEED = st.integers(min_value=0, max_value=2**63 - 1) | st.sampled_from([0, 2**63 - 1, 2**62])
STOP = st.none() | st.text(max_size=256) | st.lists(st.text(min_size=0, max_size=256), max_size=4)
MODEL = st.sampled_from(["tiny-llama", "tiny-llama", "a1", "a1", "a1", "b1", "missing"])
ROLE = st.sampled_from(["user", "system", "assistant", "developer"])
CONTENT = TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=3)
TOKENS = st.lists(st.integers(min_value=0, max_value=49_151), min_size=1, max_size=40)
PROMPT = (
    TEXT.filter(bool)
    | st.lists(TEXT.filter(bool), min_size=1, max_size=8)
    | TOKENS
    | st.lists(TOKENS, min_size=1, max_size=4)
)
SAMPLING = {
    "temperature": TEMPERATURE,
    "top_p": st.floats(min_value=1e-9, max_value=1.0),
    "n": st.integers(min_value=1, max_value=4),
    "seed": SEED,
    "stop": STOP,
    "stream": st.booleans(),
    "min_tokens": st.integers(min_value=0, max_value=12),
    "user": TEXT,
}
CHAT_FIELDS = {
    "max_tokens": st.integers(min_value=1, max_value=12),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=20),
    **SAMPLING,
}
COMPLETION_FIELDS = {
    "max_tokens": st.integers(min_value=0, max_value=12),
    "echo": st.booleans(),
    "logprobs": st.integers(min_value=0, max_value=5),
    **SAMPLING,
}


def _body(required: dict[str, Any], fields: dict[str, Any], *, hostile: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A body within the schema, or (``hostile``) one whose every field may also be any number or JSON."""
    if not hostile:
        return st.fixed_dictionaries(required, optional=fields).map(_consistent)
    if hostile:
        required = {k: v | NUMBERS | JSON for k, v in required.items()}
        fields = {k: v | NUMBERS | JSON for k, v in fields.items()}
        fields.update(presence_penalty=NUMBERS, logit_bias=JSON, suffix=TEXT, best_of=NUMBERS, surprise=JSON)
    return st.fixed_dictionaries(required, optional=fields)


def _consistent(body: dict[str, Any]) -> dict[str, Any]:
    """What the schema asks across fields: top_logprobs with logprobs, at most 8 generations."""
    if "top_logprobs" in body:
        body["logprobs"] = True
    prompts = body.get("prompt")
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], str | list):
        body["n"] = min(body.get("n", 1), 8 // len(prompts))
    return body


MESSAGE = st.fixed_dictionaries({"role": ROLE}, optional={"content": CONTENT, "name": TEXT})
CHAT = {"model": MODEL, "messages": st.lists(MESSAGE, min_size=1, max_size=4)}
COMPLETION = {"model": MODEL, "prompt": PROMPT}
ANSWERED: dict[int, int] = {}  # statuses of the bodies within the schema: the fuzzing must reach the engine


def _send(server: Running, path: str, body: Any, key: str = "a") -> httpx.Response:
    if isinstance(body, dict) and body.get("model") == "tiny-llama":
        body = {**body, "model": server.engine.model_id}
    content = json.dumps(body, allow_nan=True)  # NaN and Infinity too: Python's own JSON writes them
    headers = {"Authorization": f"Bearer {server.keys[key]}", "Content-Type": "application/json"}
    response = httpx.post(server.url + path, content=content, headers=headers, timeout=120)
    assert response.status_code < 500, f"{response.status_code} for {content[:500]}: {response.text[:500]}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"server_error"' not in response.text, f"a stream failed for {content[:500]}: {response.text[-500:]}"
    return response


def _count(body: dict[str, Any], status: int) -> None:
    """Count the status of a body naming a model its key may use (another tenant's and a missing one are 404s)."""
    if body.get("model") in ("tiny-llama", "a1"):
        ANSWERED[status] = ANSWERED.get(status, 0) + 1


@FUZZ
@given(_body(CHAT, CHAT_FIELDS, hostile=False))
def test_any_chat_request_within_the_schema_is_served(fuzzed: Running, body: dict[str, Any]) -> None:
    _count(body, _send(fuzzed, "/v1/chat/completions", body).status_code)


@FUZZ
@given(_body(COMPLETION, COMPLETION_FIELDS, hostile=False))
def test_any_completion_request_within_the_schema_is_served(fuzzed: Running, body: dict[str, Any]) -> None:
    _count(body, _send(fuzzed, "/v1/completions", body).status_code)


@FUZZ
@given(
    st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    _body(CHAT, CHAT_FIELDS, hostile=True) | _body(COMPLETION, COMPLETION_FIELDS, hostile=True),
)
def test_any_field_out_of_the_schema_is_a_4xx(fuzzed: Running, path: str, body: dict[str, Any]) -> None:
    _send(fuzzed, path, body)


@FUZZ
@given(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/admin/adapters/load"]), JSON)
def test_any_json_at_all_gets_an_answer_below_500(fuzzed: Running, path: str, body: Any) -> None:
    _send(fuzzed, path, body, key="admin")


def test_the_engine_still_serves_after_the_fuzzing(fuzzed: Running) -> None:
    body = {"model": fuzzed.engine.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert _send(fuzzed, "/v1/chat/completions", body).status_code == 200
    assert fuzzed.engine.alive()
    # Most bodies within the schema were served, not refused: the fuzzing reached the engine.
    assert ANSWERED.get(200, 0) >= sum(ANSWERED.values()) // 2, ANSWERED
