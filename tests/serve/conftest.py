"""A real server on a free loopback port, over the tiny model, with tenants, keys and adapters."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    seed: int,
    r: int = 8,
    scale: float = 0.5,
    targets: str | list[str] = "all-linear",
    verdict: str | None = None,
) -> Path:
    """A random (untrained) LoRA adapter on ``model_dir`` with a manifest, as `loraforge train` writes it
    (and, with ``verdict``, as `loraforge eval` leaves it: its release gate's verdict recorded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.files import sha256_file
    from loraforge.models.sources import resolve_base_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=scale)
    peft_model.save_pretrained(out)
    base = resolve_base_model(str(model_dir), out.parent)
    manifest = {
        "base_model": base.to_json(),
        # A passed governance record, as `loraforge train` writes it for licensed, redacted data.
        "licensing": {"ok": True},
        "data_governance": {"pii": {"action": "redact", "examples_with_pii": 0}},
        "governance_flags": [],
        "checksums": {n: sha256_file(out / n) for n in ("adapter_config.json", "adapter_model.safetensors")},
    }
    if verdict:
        manifest["evaluation"] = {"verdict": verdict, "policy": {"max_regression": 0.02}, "headline": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    home: Path
    keys: dict[str, str]  # "a", "b", "admin" (all tenants), "a-admin" (tenant-a's) → key
    engine: Any
    app: Any


def start_server(home: Path, model_dir: Path, **overrides: Any) -> Iterator[Running]:
    import uvicorn

    from loraforge.serve.config import ServeConfig
    from loraforge.serve.keys import KeyStore
    from loraforge.serve.server import build_server

    keys = {
        "a": KeyStore(home).create("tenant-a")[0],
        "b": KeyStore(home).create("tenant-b")[0],
        "admin": KeyStore(home).create("ops", "admin", all_tenants=True)[0],
        "a-admin": KeyStore(home).create("tenant-a", "admin")[0],  # an admin of tenant-a only
    }
    config = ServeConfig(base_model=str(model_dir), port=free_port(), admin_endpoints=True, **overrides)
    server = build_server(config, home)
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=config.port, log_config=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield Running(f"http://127.0.0.1:{config.port}", home, keys, server.engine, server.app)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        server.engine.close()


@pytest.fixture(scope="session")
def gguf_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with the values a GGUF file would give it: projections rounded through
    Q4_1 blocks, the (tied) embedding through Q8_0, as the default base model's are."""
    import shutil

    from safetensors.torch import load_file, save_file

    from loraforge.serve.blocks import dequantize, quantize

    out = tmp_path_factory.mktemp("tiny-gguf")
    for path in tiny_model_dir.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, out / path.name)
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, weight in weights.items():
        if weight.dim() == 2:
            weights[name] = dequantize(quantize(weight, "q8_0" if "embed" in name else "q4_1"))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed=i) for i, name in enumerate(("a1", "a2", "b1", "p1"))}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, adapter_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    from loraforge.serve.adapters import AdapterStore

    home = tmp_path_factory.mktemp("serve-home")
    store = AdapterStore(home)
    store.add(adapter_dirs["a1"], "a1", tenant="tenant-a")
    store.add(adapter_dirs["a2"], "a2", tenant="tenant-a")
    store.add(adapter_dirs["b1"], "b1", tenant="tenant-b")
    store.add(adapter_dirs["p1"], "p1", tenant=None)
    yield from start_server(home, tiny_model_dir, max_batch_size=8)


@pytest.fixture
def client(server: Running):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=server.keys["a"], max_retries=0)
