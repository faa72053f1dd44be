"""Fixtures of the export tests: the tiny model as a GGUF, and an adapter on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.export.gguf import write_model_gguf
from loraforge.models.sources import DEFAULT_BASE_MODEL, gguf_file_of
from tests.serve.conftest import make_adapter


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model as an f32 GGUF with the default model's tokenizer (the tiny model shares it)."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    packaged = gguf_file_of(DEFAULT_BASE_MODEL)
    assert packaged is not None
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    write_model_gguf(out, model.state_dict(), model.config, "f32", GGUFReader(str(packaged)), {})
    return out


@pytest.fixture(scope="session")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("export-adapters") / "support", seed=3, r=4)
