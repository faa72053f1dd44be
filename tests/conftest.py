"""Shared fixtures: the real default model's files (cached once for all tests) and a tiny random Llama.

The tiny model uses the real SmolLM2 tokenizer and chat template (so masks are tested against
the real template) with a 2-layer, 64-wide random network: a training step takes milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "src" / "loraforge" / "samples"
# One dequantized copy of the default model for every test run (and every test home).
os.environ.setdefault("LORAFORGE_MODEL_CACHE", str(REPO / ".cache" / "models"))

from loraforge.runtime import configure_process  # noqa: E402

configure_process(quiet=False)


@pytest.fixture(scope="session", autouse=True)
def audit_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One audit HMAC key for the run (servers and CLI subprocesses inherit it), never the user's own."""
    path = tmp_path_factory.mktemp("audit-key") / "audit.key"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFORGE_AUDIT_KEY_FILE", str(path))
        yield path


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ["LORAFORGE_MODEL_CACHE"])


@pytest.fixture(scope="session")
def real_base(model_cache: Path):  # type: ignore[no-untyped-def]
    from loraforge.models.sources import DEFAULT_BASE_MODEL, resolve_base_model

    return resolve_base_model(DEFAULT_BASE_MODEL, model_cache)


@pytest.fixture(scope="session")
def tokenizer(real_base):  # type: ignore[no-untyped-def]
    from loraforge.models.sources import load_tokenizer

    return load_tokenizer(real_base)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, real_base) -> Path:  # type: ignore[no-untyped-def]
    """A local HF model directory: random 2-layer Llama + the real tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    real_config = json.loads((real_base.path / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=real_config["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=real_config["bos_token_id"],
        eos_token_id=real_config["eos_token_id"],
        pad_token_id=real_config["pad_token_id"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (real_base.path / name).exists():
            shutil.copy(real_base.path / name, out / name)
    return out


@pytest.fixture
def write_jsonl(tmp_path: Path):  # type: ignore[no-untyped-def]
    def write(records: list[object], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return path

    return write


def chat(user: str, assistant: str, system: str | None = None) -> dict[str, object]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    return {"messages": messages}


from tests.postgres import fresh_postgres_url, postgres_server  # noqa: E402, F401  (fixtures)
