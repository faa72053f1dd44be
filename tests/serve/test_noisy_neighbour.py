"""A noisy neighbour on the tiny model: the quiet tenant's streams all succeed, unchanged, while
the noisy tenant's worst requests get answers below 500 (bench/noisy_neighbour.py measures the
latency on the real model: a timing claim belongs to a benchmark, not to a test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.noisy_neighbour import noisy_requests, run_scenario

from tests.serve.conftest import start_server


def test_a_flooding_tenant_cannot_break_or_stall_another(
    tmp_path: Path, tiny_model_dir: Path, adapter_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from loraforge.serve.adapters import AdapterStore
    from loraforge.serve.keys import KeyStore

    home = tmp_path / "home"
    store = AdapterStore(home)
    names = [f"noisy{i}" for i in range(4)]
    for i, name in enumerate(names):
        store.add(adapter_dirs[("a1", "a2", "b1", "p1")[i]], name, tenant="noisy")
    noisy_key = KeyStore(home).create("noisy")[0]
    gen = start_server(home, tiny_model_dir, max_batch_size=8, max_loaded_adapters=2)
    server = next(gen)
    try:
        requests = noisy_requests(server.engine.model_id, names, server.engine.max_batch_size)
        figures = run_scenario(
            server.url,
            server.keys["a"],
            noisy_key,
            requests,
            model=server.engine.model_id,
            victim_requests=4,
            noisy_clients=8,  # more than the batch holds: the quiet tenant finds it full
            tokens=16,
        )
        preemptions = server.engine.stats()["preemptions"]
        alive = server.engine.alive()
    finally:
        gen.close()
    with capsys.disabled():
        print(f"\nnoisy neighbour on the tiny model: {figures}, preemptions {preemptions}")
    assert figures["texts_equal"]  # the quiet tenant's answers are the same with the flood
    statuses = figures["noisy_statuses"]
    assert statuses and all(200 <= s < 500 for s in statuses), statuses
    assert statuses.get(200, 0) > 0
    assert alive and preemptions >= 1
