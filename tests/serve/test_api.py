"""The OpenAI-compatible API through the real ``openai`` SDK, on the tiny model."""

from __future__ import annotations

import httpx
import openai
import pytest


def test_chat_completion_has_openai_shape(client) -> None:  # type: ignore[no-untyped-def]
    r = client.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_matches_non_streaming(client) -> None:  # type: ignore[no-untyped-def]
    kwargs = {"model": "a1", "messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completions_echo_logprobs_score_the_prompt(client, server) -> None:  # type: ignore[no-untyped-def]
    r = client.completions.create(
        model=server.engine.model_id, prompt="The cat sat", max_tokens=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The cat sat"
    assert lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.prompt_tokens


def test_models_list_shows_own_and_public(client, server) -> None:  # type: ignore[no-untyped-def]
    ids = {m.id: m for m in client.models.list()}
    base = server.engine.model_id
    assert set(ids) == {base, "a1", "a2", "p1"}
    assert ids["a1"].parent == base  # type: ignore[attr-defined]


def test_foreign_and_missing_adapters_give_the_same_404(client) -> None:  # type: ignore[no-untyped-def]
    errors = []
    for model in ("b1", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        errors.append(e.value.body)
    assert errors[0]["message"].replace("b1", "X") == errors[1]["message"].replace("no-such-adapter", "X")
    assert errors[0]["code"] == errors[1]["code"] == "model_not_found"


def test_malformed_json_and_wrong_types_are_400_not_500(server) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {server.keys['a']}", "Content-Type": "application/json"}
    url = server.url + "/v1/chat/completions"
    bad = [
        b"{not json",
        b'{"model": "a1", "messages": "hello"}',
        b'{"model": "a1", "messages": [{"role": "wizard", "content": "x"}]}',
        b'{"model": "a1", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
        b'{"model": "a1", "messages": [{"role": "user", "content": "x"}], "n": 9}',
        b'{"model": "a1", "messages": [{"role": "user", "content": "x"}], "temperature": -1}',
        b"[]",
    ]
    for body in bad:
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_context_overflow_is_a_400_with_both_numbers(client, server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=server.engine.context_length
        )
    message = e.value.body["message"]
    assert str(server.engine.context_length) in message and "in the prompt" in message
    assert e.value.body["code"] == "context_length_exceeded"


def test_authentication(server) -> None:  # type: ignore[no-untyped-def]
    from openai import OpenAI

    for key in ("wrong-key",):
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_n_choices_seed_and_stop(client, server) -> None:  # type: ignore[no-untyped-def]
    kwargs = {"model": "a1", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 10}
    r = client.chat.completions.create(**kwargs, n=3, temperature=1.0, seed=11)
    again = client.chat.completions.create(**kwargs, n=3, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert 3 <= r.usage.completion_tokens <= 30
    greedy = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    assert len(greedy) > 2
    stop = greedy[1:3]
    cut = client.chat.completions.create(**kwargs, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[: greedy.index(stop)]


def test_chat_logprobs(client) -> None:  # type: ignore[no-untyped-def]
    r = client.chat.completions.create(
        model="p1",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5  # greedy picks the top token


def test_health_and_ready(server) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["model"] == server.engine.model_id
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_shared_system_prompt_is_reused_within_a_tenant_only(server) -> None:  # type: ignore[no-untyped-def]
    """The public adapter p1, one long system prompt: tenant a's second request reuses the first's
    prefix and answers the same; tenant b, on the same adapter, starts cold."""
    from openai import OpenAI

    def hits() -> int:
        return int(server.engine.stats()["prefix_cache_hit_tokens"])

    system = "You answer questions about bicycles, returns and warranties. " * 24  # > 2 blocks of 64
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Can I return a bike?"}]
    a = OpenAI(base_url=server.url + "/v1", api_key=server.keys["a"], max_retries=0)
    b = OpenAI(base_url=server.url + "/v1", api_key=server.keys["b"], max_retries=0)

    def ask(client: OpenAI) -> str:
        r = client.chat.completions.create(model="p1", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
        return str(r.choices[0].message.content)

    before = hits()
    first = ask(a)
    assert hits() == before
    assert ask(a) == first
    reused = hits() - before
    assert reused >= 128
    assert ask(b) == first
    assert hits() - before == reused  # nothing of tenant a's was reused for tenant b
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.keys['admin']}"}).text
    assert "loraforge_prefix_cache_hit_ratio" in metrics and "loraforge_prefix_cache_bytes" in metrics
    assert not any(k.startswith("prefix_cache") for k in httpx.get(server.url + "/ready").json())  # no key there
