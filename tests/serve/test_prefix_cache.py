"""Prompt-prefix reuse: the same logits and tokens as a full prefill, scopes kept apart, LRU by bytes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from loraforge.files import sha256_file
from loraforge.serve.adapter_cache import load_lora
from loraforge.serve.adapters import Registration
from loraforge.serve.calls import cache_scope
from loraforge.serve.engine import LocalEngine
from loraforge.serve.generation import GenerationRequest, SamplingParams
from loraforge.serve.prefix_cache import PrefixCache

from .test_engine import _FakeTokenizer, _generate, _runner


def _kv(tokens: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((2, 2, 1, tokens, 4), float(value))  # (layers, 2, kv_heads, tokens, head_dim)


def test_prefill_after_a_cached_prefix_equals_a_full_prefill(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    runner = _runner(tiny_model_dir)
    lora = load_lora(adapter_dirs["a1"], sha256_file(adapter_dirs["a1"] / "adapter_model.safetensors"), runner)
    rng = random.Random(0)
    long, other = [rng.randrange(100, 40000) for _ in range(150)], [rng.randrange(100, 40000) for _ in range(20)]
    full = runner.prefill_many([0, 1], [long, other], [lora, None])
    expected_kv = runner.kv[:, :, 0, :, :150].clone()
    blocks = [runner.read_prefix(0, 0, 64), runner.read_prefix(0, 64, 128)]
    assert runner.write_prefix(2, blocks) == 128
    # One call with a cached prompt (128 positions already in slot 2) beside a fresh one.
    again = runner.prefill_many([2, 3], [long[128:], other], [lora, None], past=[128, 0])
    assert (again - full).abs().max() < 1e-4
    assert (runner.kv[:, :, 2, :, :150] - expected_kv).abs().max() < 1e-4


def test_lookup_leaves_the_last_token_and_follows_the_whole_prefix() -> None:
    cache = PrefixCache(capacity_bytes=10**6, block=4)
    prompt = list(range(10))
    reads: list[tuple[int, int]] = []

    def read(a: int, b: int) -> torch.Tensor:
        reads.append((a, b))
        return _kv(b - a, a)

    cache.insert("t\x00base", prompt, read)
    assert reads == [(0, 4), (4, 8)]  # whole blocks only
    got = cache.lookup("t\x00base", prompt)
    assert [int(b[0, 0, 0, 0, 0]) for b in got] == [0, 4]
    assert len(cache.lookup("t\x00base", prompt[:8])) == 1  # its 8th token must be prefilled
    assert cache.lookup("t\x00base", [99, *prompt[1:]]) == []  # the same later block after another start
    assert cache.lookup("u\x00base", prompt) == []  # another scope
    stats = cache.stats()
    assert stats.blocks == 2 and stats.hit_tokens == 12 and stats.bytes == 2 * _kv(4).nbytes
    cache.insert("t\x00base", [*prompt, 10, 11], read)  # only the block not cached yet is read
    assert reads[2:] == [(8, 12)]


def test_eviction_takes_a_prefix_tail_first_and_respects_the_budget() -> None:
    block_bytes = _kv(4).nbytes
    cache = PrefixCache(capacity_bytes=3 * block_bytes, block=4)
    a, b = list(range(100, 113)), list(range(200, 213))
    cache.insert("s", a, lambda i, j: _kv(j - i))  # 3 blocks: full
    cache.insert("s", b, lambda i, j: _kv(j - i))  # 3 more: a's blocks go
    assert cache.stats().bytes <= 3 * block_bytes
    assert len(cache.lookup("s", b)) == 3 and cache.lookup("s", a) == []
    cache.insert("s", a[:9], lambda i, j: _kv(j - i))  # 2 blocks of a: b loses its tail, not its head
    assert len(cache.lookup("s", b)) == 1 and len(cache.lookup("s", a)) == 2
    off = PrefixCache(capacity_bytes=0, block=4)
    off.insert("s", a, lambda i, j: _kv(j - i))
    assert off.lookup("s", a) == [] and off.stats().bytes == 0


def test_a_prompt_longer_than_the_budget_keeps_its_head() -> None:
    block_bytes = _kv(4).nbytes
    cache = PrefixCache(capacity_bytes=3 * block_bytes, block=4)
    other = list(range(500, 509))
    cache.insert("s", other, lambda i, j: _kv(j - i))  # 2 blocks of someone else
    long = list(range(100, 121))  # 5 whole blocks
    reads: list[int] = []

    def read(i: int, j: int) -> torch.Tensor:
        reads.append(i)
        return _kv(j - i)

    cache.insert("s", long, read)
    assert cache.stats().bytes <= 3 * block_bytes
    assert len(cache.lookup("s", long)) == 3  # its first three blocks, not its last three
    assert cache.lookup("s", other) == []  # the older prefix made room
    assert reads == [0, 4, 8, 12]  # the fourth block found no room that was not its own, and stopped


def test_engine_reuses_a_prefix_with_the_same_tokens_and_keeps_scopes_apart(tiny_model_dir: Path) -> None:
    rng = random.Random(1)
    system = [rng.randrange(100, 40000) for _ in range(140)]
    prompts = [system + [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 9))] for _ in range(4)]
    params = SamplingParams(max_tokens=8, temperature=0)
    plain = LocalEngine(_runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny")
    try:
        expected = [_generate(plain, [GenerationRequest(f"r{i}", p, params)], 0)[0] for i, p in enumerate(prompts)]
    finally:
        plain.close()
    cache = PrefixCache(capacity_bytes=64 * 2**20)
    engine = LocalEngine(_runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny", prefix_cache=cache)
    try:
        first = _generate(engine, [GenerationRequest("a", prompts[0], params, cache_scope="acme")], 0)
        assert engine.stats()["prefix_cache_hit_tokens"] == 0
        rest = _generate(
            engine, [GenerationRequest(f"b{i}", p, params, cache_scope="acme") for i, p in enumerate(prompts[1:])], 0.01
        )
        assert engine.stats()["prefix_cache_hit_tokens"] == 3 * 128  # two blocks of the system prompt each
        other = _generate(engine, [GenerationRequest("c", prompts[1], params, cache_scope="globex")], 0)
        assert engine.stats()["prefix_cache_hit_tokens"] == 3 * 128  # another tenant starts cold
        unscoped = _generate(engine, [GenerationRequest("d", prompts[2], params)], 0)
        assert engine.stats()["prefix_cache_hit_tokens"] == 3 * 128
    finally:
        engine.close()
    assert first + rest == expected
    assert other[0] == expected[1] and unscoped[0] == expected[2]


def test_a_row_that_finishes_at_once_does_not_change_what_is_cached(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """One admission: A (base, one token) finishes on its first token, which moves B's and C's
    rows to other slots; B's prompt must still be cached from B's own keys and values."""
    import threading

    rng = random.Random(2)
    system = [rng.randrange(100, 40000) for _ in range(140)]
    prompt_b, prompt_d = [*system, 11, 12, 13], [*system, 21, 22]
    greedy = SamplingParams(max_tokens=6, temperature=0)
    cold = LocalEngine(_runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny")
    try:
        expected_d = _generate(cold, [GenerationRequest("d", prompt_d, greedy)], 0)[0]
    finally:
        cold.close()
    runner = _runner(tiny_model_dir)
    lora = load_lora(adapter_dirs["a1"], sha256_file(adapter_dirs["a1"] / "adapter_model.safetensors"), runner)
    engine = LocalEngine(runner, tokenizer=_FakeTokenizer(), model_id="tiny", prefix_cache=PrefixCache(2**26))
    try:
        release, holding = threading.Event(), threading.Event()

        def hold() -> None:
            holding.set()
            release.wait(10)

        blocker = threading.Thread(target=lambda: engine.call(hold))
        blocker.start()
        assert holding.wait(10)  # the engine is inside the call: the next three are admitted together
        batch = [
            GenerationRequest("a", [5, 6, 7], SamplingParams(max_tokens=1, temperature=0), cache_scope="t"),
            GenerationRequest("b", prompt_b, greedy, cache_scope="t"),
            GenerationRequest(
                "c", [rng.randrange(100, 40000) for _ in range(150)], greedy, "a1", lora, cache_scope="u"
            ),
        ]
        threading.Timer(0.3, release.set).start()
        _generate(engine, batch, 0)
        blocker.join(10)
        d = _generate(engine, [GenerationRequest("d", prompt_d, greedy, cache_scope="t")], 0)[0]
        assert engine.stats()["prefix_cache_hit_tokens"] == 128
    finally:
        engine.close()
    assert d == expected_d


def _registration(name: str, weights: str, added_at: float) -> Registration:
    return Registration(name, None, "m", "0" * 64, weights, added_at, "/x")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("acme", None), ("globex", None)),  # tenants
        (("acme", _registration("bot", "1" * 64, 1.0)), ("acme", None)),  # an adapter and the base
        (("acme", _registration("bot", "1" * 64, 1.0)), ("acme", _registration("bot", "2" * 64, 2.0))),  # new weights
        (("acme", _registration("bot", "1" * 64, 1.0)), ("acme", _registration("bot", "1" * 64, 2.0))),  # new config
        (("acme", _registration("bot", "1" * 64, 1.0)), ("acme", _registration("bot2", "1" * 64, 1.0))),
    ],
)
def test_cache_scopes_differ(a: tuple[str, Registration | None], b: tuple[str, Registration | None]) -> None:
    assert cache_scope(*a) != cache_scope(*b)
    assert cache_scope(*a) == cache_scope(*a)


def test_many_requests_sharing_prefixes_get_the_tokens_of_a_cold_run(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """Three system prompts, two tenants, the base and two adapters, rows joining and leaving
    (some after one token): with the cache every request gets exactly its cold, alone tokens."""
    runner = _runner(tiny_model_dir, slots=6)
    loras = {
        name: load_lora(adapter_dirs[name], sha256_file(adapter_dirs[name] / "adapter_model.safetensors"), runner)
        for name in ("a1", "a2")
    }
    rng = random.Random(3)
    systems = [[rng.randrange(100, 40000) for _ in range(rng.randrange(64, 200))] for _ in range(3)]
    requests = []
    for i in range(18):
        adapter = [None, "a1", "a2"][i % 3]
        prompt = systems[rng.randrange(3)] + [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 6))]
        params = SamplingParams(max_tokens=rng.choice([1, 2, 5, 9]), temperature=0)
        lora = loras[adapter] if adapter else None
        scope = f"{['t', 'u'][i % 2]}/{adapter}"
        requests.append(GenerationRequest(f"r{i}", prompt, params, adapter, lora, cache_scope=scope))
    cold = LocalEngine(runner, tokenizer=_FakeTokenizer(), model_id="tiny")
    try:
        alone = [_generate(cold, [r], 0)[0] for r in requests]
    finally:
        cold.close()
    engine = LocalEngine(runner, tokenizer=_FakeTokenizer(), model_id="tiny", prefix_cache=PrefixCache(2**26))
    try:
        together = _generate(engine, requests, stagger=0.005)
        hits = engine.stats()["prefix_cache_hit_tokens"]
    finally:
        engine.close()
    assert hits > 0
    assert together == alone
