"""What `adapters add` refuses, and what every load checks again (table-driven)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from loraforge.errors import ConfigError, ModelError
from loraforge.serve.adapter_cache import read_adapter
from loraforge.serve.adapters import AdapterStore


def _rechecksum(directory: Path) -> None:
    """Write the manifest's checksums anew, as if the change had been made before training ended."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["checksums"] = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        config = json.loads((directory / "adapter_config.json").read_text())
        config.update(changes)
        (directory / "adapter_config.json").write_text(json.dumps(config))
        _rechecksum(directory)

    return edit


def _symlinked_weights(directory: Path) -> None:
    real = directory.parent / f"{directory.name}-weights.safetensors"
    shutil.move(directory / "adapter_model.safetensors", real)
    (directory / "adapter_model.safetensors").symlink_to(real)


def _fifo_config(directory: Path) -> None:
    (directory / "adapter_config.json").unlink()
    os.mkfifo(directory / "adapter_config.json")


def _infinite_weight(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = math.inf
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    _rechecksum(directory)


def _no_config_checksum(directory: Path) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["checksums"]["adapter_config.json"]
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _quietly(directory: Path) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1000}))


def _symlinked_eval(directory: Path) -> None:
    (directory / "eval").mkdir()
    (directory / "eval" / "eval.html").symlink_to("/etc/hostname")


REFUSALS = [
    ("symlinked weights", _symlinked_weights, {}, ModelError, "symbolic link"),
    ("FIFO config", _fifo_config, {}, ModelError, "not a regular file"),
    ("file above the size limit", lambda d: None, {"max_bytes": 1000}, ModelError, "more than the limit of 1000 bytes"),
    ("rank above the limit", lambda d: None, {"max_rank": 4}, ModelError, "rank 8 is above this server's limit of 4"),
    ("rank pattern above the limit", _edit_config(rank_pattern={"q_proj": 128}), {}, ModelError, "rank 128"),
    ("infinite alpha", _edit_config(lora_alpha=math.inf), {}, ModelError, "lora_alpha must be a finite"),
    ("negative alpha", _edit_config(lora_alpha=-2), {}, ModelError, "lora_alpha must be a finite"),
    ("text alpha", _edit_config(lora_alpha="16"), {}, ModelError, "lora_alpha must be a finite"),
    ("an inf weight", _infinite_weight, {}, ModelError, "inf or nan"),
    ("DoRA", _edit_config(use_dora=True), {}, ModelError, "DoRA"),
    ("no checksum of the config", _no_config_checksum, {}, ModelError, "no checksum of adapter_config.json"),
    ("config edited after training", lambda d: _quietly(d), {}, ModelError, "config.json has sha256 .* changed after"),
    ("a symlink among the evidence", _symlinked_eval, {}, ModelError, "symbolic link"),
]


@pytest.mark.parametrize(("case", "damage", "limits", "error", "says"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_adapters_add_refuses(  # type: ignore[no-untyped-def]
    tmp_path: Path, adapter_dirs, case: str, damage, limits: dict[str, int], error: type, says: str
) -> None:
    source = Path(shutil.copytree(adapter_dirs["a1"], tmp_path / "adapter"))
    damage(source)
    store = AdapterStore(tmp_path / "home", **limits)
    with pytest.raises(error, match=says):
        store.add(source, "candidate", tenant="acme")
    assert store.registrations() == []
    assert not (tmp_path / "home" / "adapters" / "candidate").exists()


def test_a_symlinked_adapter_directory_is_refused(tmp_path: Path, adapter_dirs) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "link").symlink_to(adapter_dirs["a1"])
    with pytest.raises(ModelError, match="symbolic link"):
        AdapterStore(tmp_path / "home").add(tmp_path / "link", "x", tenant="acme")


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "BASE"])
def test_an_adapter_cannot_take_a_base_models_name(tmp_path: Path, adapter_dirs, name: str) -> None:  # type: ignore[no-untyped-def]
    base_dir_name = Path(json.loads((adapter_dirs["a1"] / "manifest.json").read_text())["base_model"]["name"]).name
    name = base_dir_name if name == "BASE" else name
    with pytest.raises(ConfigError, match="name of a base model"):
        AdapterStore(tmp_path / "home").add(adapter_dirs["a1"], name, tenant="acme")


@pytest.mark.parametrize(
    ("governance", "override", "says"),
    [
        ({"licensing": {"ok": False}}, None, "licence check of its training data did not pass"),
        ({"licensing": None}, None, "no licence record"),
        ({"data_governance": {"pii": {"action": "report", "examples_with_pii": 3}}}, None, "--pii report"),
        ({"governance_flags": [{"flag": "allow_secrets", "detail": "secrets kept"}]}, None, "allow_secrets"),
        ({"licensing": {"ok": False}}, "   ", "override-governance"),
    ],
)
def test_publishing_needs_a_passed_governance_record_or_an_override(  # type: ignore[no-untyped-def]
    tmp_path: Path, adapter_dirs, governance: dict[str, object], override: str | None, says: str
) -> None:
    source = Path(shutil.copytree(adapter_dirs["a1"], tmp_path / "adapter"))
    manifest = json.loads((source / "manifest.json").read_text())
    manifest.update(governance)
    (source / "manifest.json").write_text(json.dumps(manifest))
    store = AdapterStore(tmp_path / "home")
    with pytest.raises(ConfigError, match=says):
        store.add(source, "shared", tenant=None, governance_override=override)
    store.add(source, "mine", tenant="acme")  # for one tenant it needs no governance record
    reg = store.add(source, "shared", tenant=None, governance_override="approved by legal, ticket 42")
    assert store.get("shared") == reg and reg.governance_override == "approved by legal, ticket 42"
    flags = [f["flag"] for f in manifest.get("governance_flags") or []]  # type: ignore[union-attr]
    assert list(reg.governance_flags) == flags


def test_a_passed_record_publishes_without_override(tmp_path: Path, adapter_dirs) -> None:  # type: ignore[no-untyped-def]
    reg = AdapterStore(tmp_path / "home").add(adapter_dirs["a1"], "shared", tenant=None, governance_override="unused")
    assert reg.public and reg.governance_override is None


def test_every_load_checks_both_checksums(tmp_path: Path, adapter_dirs) -> None:  # type: ignore[no-untyped-def]
    store = AdapterStore(tmp_path / "home")
    reg = store.add(adapter_dirs["a1"], "x", tenant="acme")
    stored = store.path("x")
    assert read_adapter(stored, reg.weights_sha256, reg.config_sha256).alpha > 0
    config = json.loads((stored / "adapter_config.json").read_text())
    config["lora_alpha"] = 1000.0  # a quiet edit in the store: 60× the scale
    (stored / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"adapter_config\.json was changed after the adapter was registered"):
        read_adapter(stored, reg.weights_sha256, reg.config_sha256)
    with pytest.raises(ModelError, match="changed after"):  # an older registration: the stored manifest's
        read_adapter(stored, reg.weights_sha256, "")
    with pytest.raises(ModelError, match="limit of 4"):
        shutil.copy(adapter_dirs["a1"] / "adapter_config.json", stored / "adapter_config.json")
        read_adapter(stored, reg.weights_sha256, reg.config_sha256, max_rank=4)


def test_a_tenant_cycling_through_adapters_replaces_only_its_own(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_model_dir: Path, adapter_dirs
) -> None:
    from loraforge.serve.adapter_cache import AdapterCache
    from tests.serve.test_engine import _runner

    store = AdapterStore(tmp_path / "home")
    mine = [store.add(adapter_dirs[s], f"a-{s}", tenant="A") for s in ("a1", "a2")]
    theirs = [store.add(adapter_dirs[s], f"b-{s}", tenant="B") for s in ("a1", "a2", "b1", "p1")]
    cache = AdapterCache(store, _runner(tiny_model_dir), base_sha256=mine[0].base_sha256, capacity=4, per_tenant=2)
    for reg in mine:
        cache.get(reg, "A")
    for i in range(12):  # B cycles through four adapters, twice its quota
        cache.get(theirs[i % 4], "B")
        assert {"a-a1", "a-a2"} <= set(cache.loaded())
        assert sum(name.startswith("b-") for name in cache.loaded()) <= 2
    cache.get(mine[0], "A")  # still a hit
    assert len(cache.loaded()) <= 4
