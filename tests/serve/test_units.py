"""Table-driven units: text deltas and stop strings, token buckets, the audit chain, the stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraforge.errors import ConfigError, ModelError
from loraforge.govern.audit import AuditLog, verify_audit_log
from loraforge.serve.adapters import AdapterStore
from loraforge.serve.detokenize import TextStream
from loraforge.serve.keys import KeyStore
from loraforge.serve.limits import LimitExceeded, Limits, RateLimiter


class CharTokenizer:
    """Token id = a character code; 0xFFFD stands for half a multi-byte character."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


STOP_CASES = [
    # (generated text, stop strings, deltas sent, stopped)
    ("hello", [], ["h", "e", "l", "l", "o"], False),
    ("ab###cd", ["###"], ["a", "b", "", "", ""], True),
    ("ab#c", ["##"], ["a", "b", "", "#c"], False),  # '#' held back until it cannot start '##'
    ("xEND", ["END", "xE"], ["", ""], True),  # the earliest stop wins
    ("a\ufffdb", [], ["a", "", "\ufffdb"], False),
]


@pytest.mark.parametrize(("text", "stops", "deltas", "stopped"), STOP_CASES)
def test_text_stream(text: str, stops: list[str], deltas: list[str], stopped: bool) -> None:
    stream = TextStream(CharTokenizer(), stops)
    sent, hit = [], False
    for ch in text:
        delta, hit = stream.push(ord(ch))
        sent.append(delta)
        if hit:
            break
    assert sent == deltas and hit == stopped
    if not stopped:
        assert "".join(sent) + stream.flush() == text


def test_token_buckets_refill_over_a_minute() -> None:
    now = [0.0]
    limiter = RateLimiter(Limits(requests_per_minute=2, tokens_per_minute=100, max_concurrent=1), clock=lambda: now[0])
    limiter.acquire("k", 10)
    with pytest.raises(LimitExceeded, match="concurrent"):
        limiter.acquire("k", 10)
    limiter.end("k", reserved=10, used=10)
    limiter.acquire("k", 10)
    limiter.end("k", reserved=10, used=4)  # 6 unused tokens come back
    with pytest.raises(LimitExceeded) as e:
        limiter.acquire("k", 10)
    assert e.value.retry_after == 30  # one request per 30 s
    now[0] = 30.0
    limiter.acquire("k", 10)
    limiter.end("k", 10, 10)
    now[0] = 60.0  # requests are counted first (before the prompt is tokenized), then tokens
    with pytest.raises(LimitExceeded, match="more than"):
        limiter.acquire("k", 101)
    with pytest.raises(LimitExceeded, match=r"concurrent|requests per minute"):
        limiter.acquire("k", 1)  # the refused request counted: a refusal is no free retry


def test_adapter_loads_are_limited_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(
        Limits(requests_per_minute=100, tokens_per_minute=100, max_concurrent=4, adapter_loads_per_minute=3),
        clock=lambda: now[0],
    )
    for _ in range(3):
        limiter.load_adapter("k")
    with pytest.raises(LimitExceeded, match="adapters in the last minute") as e:
        limiter.load_adapter("k")
    assert e.value.retry_after == 20
    limiter.load_adapter("other")  # per key
    now[0] = 20.0
    limiter.load_adapter("k")


def test_audit_log_detects_edits_and_removals(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    for i in range(3):
        log.record("cli:test", "key.create", f"k{i}", tenant="t")
    assert verify_audit_log(log.path) == []
    lines = log.path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["target"] = "someone-else"
    log.path.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    assert any(":2: content does not match" in p for p in verify_audit_log(log.path))
    log.path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert any(":2: does not follow" in p for p in verify_audit_log(log.path))


def test_keys_are_hashed_and_validated(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key, record = store.create("acme", "admin")
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("registry.db*"))  # the database and its WAL
    assert key.encode() not in stored and record.hash.encode() in stored
    assert store.authenticate(key) == record and store.authenticate(key + "x") is None
    assert oct((tmp_path / "registry.db").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="role"):
        store.create("acme", "root")
    with pytest.raises(ConfigError, match="tenant name"):
        store.create("../etc")
    with pytest.raises(ConfigError, match="no key with id"):
        store.revoke("missing")


def test_adapter_store_refuses_bad_adapters(tmp_path: Path, adapter_dirs: dict[str, Path]) -> None:
    store = AdapterStore(tmp_path / "home")
    with pytest.raises(ConfigError, match="not allowed"):
        store.add(adapter_dirs["a1"], "../escape", tenant="t")
    store.add(adapter_dirs["a1"], "ok", tenant="t")
    with pytest.raises(ConfigError, match="already registered"):
        store.add(adapter_dirs["a1"], "ok", tenant="t")
    changed = tmp_path / "changed"
    shutil.copytree(adapter_dirs["a1"], changed)
    with open(changed / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="changed after training"):
        store.add(changed, "changed", tenant="t")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dirs["a1"], pickled)
    (pickled / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickle"):
        store.add(pickled, "pickled", tenant="t")
    assert [r.name for r in store.registrations()] == ["ok"]
    assert store.remove("ok") and store.registrations() == []


def test_adapter_for_other_base_weights_is_a_clear_400(server, adapter_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    other = tmp_path / "other-base"
    shutil.copytree(adapter_dirs["a1"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base_model"]["sha256"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    store = AdapterStore(server.home)
    store.add(other, "other-base", tenant="tenant-a")
    body = {"model": "other-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {server.keys['a']}"}
        )
    finally:
        store.remove("other-base")
    assert r.status_code == 400
    assert "trained on base weights ffffffffffff" in r.json()["error"]["message"]


def test_text_stream_equals_decoding_everything_at_once(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The real tokenizer, token by token, over text with multi-byte characters split across
    tokens, runs of spaces and special tokens: the deltas add up to the whole decoded text."""
    text = (
        "Return within 30 days 🚲 — café, naïve, 東京駅, Ελληνικά;   three spaces\n\n"
        "<|im_end|> after a special token: ok. 🤖🤖 done"
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # a character split across tokens
    stream = TextStream(tokenizer, [])
    sent = []
    for i in ids:
        delta, stopped = stream.push(i)
        assert not stopped and "\ufffd" not in delta
        sent.append(delta)
    assert "".join(sent) + stream.flush() == tokenizer.decode(ids, skip_special_tokens=True)


def test_text_stream_finds_a_stop_string_split_across_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("The answer is 42. STOP-HERE and more text", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, ["STOP-HERE"])
    sent, stopped = [], False
    for i in ids:
        delta, stopped = stream.push(i)
        sent.append(delta)
        if stopped:
            break
    assert stopped and "".join(sent) == "The answer is 42. "


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("weight_format", "int4", "weight_format must be one of auto, gguf, fp16, onednn, row-major, got 'int4'"),
        ("prefix_cache_mb", -1, "prefix_cache_mb must be >= 0, got -1"),
        ("lora_kernel", "cuda", "lora_kernel must be one of auto, native, torch, got 'cuda'"),
        ("max_batch_size", 0, "max_batch_size must be >= 1, got 0"),
        ("tenant_slowdown", 1, r"tenant_slowdown must be > 1 and <= 100, got 1"),
    ],
)
def test_serve_config_names_the_bad_value(field: str, value: object, message: str) -> None:
    from loraforge.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=message):
        ServeConfig(**{field: value})  # type: ignore[arg-type]
