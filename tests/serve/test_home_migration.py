"""A home from before the registry (keys.json, usage.jsonl, adapters/NAME/registration.json) is
imported on first start: keys keep working, registrations and usage are all there, the files are
kept as a backup, the import is audited, and a process stopped half-way imports nothing twice."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from loraforge.errors import ConfigError
from loraforge.govern.audit import AuditLog, verify_audit_log
from loraforge.registry.database import open_registry
from loraforge.registry.schema import Migration
from loraforge.serve.adapters import AdapterStore
from loraforge.serve.home_registry import home_registry
from loraforge.serve.keys import KeyStore
from loraforge.serve.usage import UsageLedger

KEY = "lf-0badc0de-an-old-key-that-was-made-before-the-registry-existed"


def _old_home(home: Path, adapter: Path) -> dict[str, str]:
    """Write the files an older loraforge kept in its home, exactly in their format."""
    home.mkdir(mode=0o700)
    keys = [
        {
            "id": "0badc0de",
            "hash": hashlib.sha256(KEY.encode()).hexdigest(),
            "tenant": "acme",
            "role": "admin",
            "created_at": 1_700_000_000.0,
            "revoked_at": None,
            "all_tenants": False,
        },
        {
            "id": "deadbeef",
            "hash": "f" * 64,
            "tenant": "globex",
            "role": "user",
            "created_at": 1_700_000_001.0,
            "revoked_at": 1_700_000_002.0,
            "all_tenants": False,
        },
    ]
    (home / "keys.json").write_text(json.dumps({"keys": keys}, indent=2))
    usage = [
        {"ts": 1.0, "request_id": "r1", "tenant": "acme", "key_id": "0badc0de", "model": "support"}
        | {"prompt_tokens": 10, "completion_tokens": 5, "cost": 0.001},
        {"ts": 2.0, "request_id": "r2", "tenant": "acme", "key_id": "0badc0de", "model": "base"}
        | {"prompt_tokens": 7, "completion_tokens": 3, "cost": 0.0005},
    ]
    torn = '{"ts": 3.0, "request_id": "r3", "ten'  # a line cut short by a crash
    (home / "usage.jsonl").write_text("\n".join(json.dumps(u) for u in usage) + "\n" + torn)
    stored = home / "adapters" / "support"
    shutil.copytree(adapter, stored)
    manifest = json.loads((adapter / "manifest.json").read_text())
    registration = {
        "name": "support",
        "tenant": "acme",
        "base_model": manifest["base_model"]["name"],
        "base_sha256": manifest["base_model"].get("sha256", ""),
        "weights_sha256": manifest["checksums"]["adapter_model.safetensors"],
        "added_at": 1_700_000_003.0,
        "source": str(adapter),
        "config_sha256": "",  # written by a version before the field: the stored manifest's is taken
        "governance_flags": [],
        "governance_override": None,
    }
    (stored / "registration.json").write_text(json.dumps(registration, indent=2))
    return {"config_sha256": manifest["checksums"]["adapter_config.json"]}


def test_an_old_home_is_imported_once_with_a_backup_and_an_audit_record(
    tmp_path: Path, adapter_dirs: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    expected = _old_home(home, adapter_dirs["a1"])

    keys = KeyStore(home)
    record = keys.authenticate(KEY)
    assert record is not None and record.tenant == "acme" and record.role == "admin"
    assert keys.authenticate("lf-deadbeef-x") is None
    assert [(r.id, r.active) for r in keys.records()] == [("0badc0de", True), ("deadbeef", False)]

    reg = AdapterStore(home).get("support")
    assert reg is not None and reg.tenant == "acme" and reg.config_sha256 == expected["config_sha256"]
    assert reg.added_at == 1_700_000_003.0

    summary = UsageLedger(home, price_prompt_1k=0, price_completion_1k=0).summary("acme")
    assert summary["total"]["requests"] == 2 and summary["total"]["prompt_tokens"] == 17
    assert set(summary["by_model"]) == {"support", "base"}

    # the originals are kept, moved out of the way; the adapter's files stay where they were
    assert not (home / "keys.json").exists() and not (home / "usage.jsonl").exists()
    assert not (home / "adapters" / "support" / "registration.json").exists()
    assert (home / "adapters" / "support" / "adapter_model.safetensors").is_file()
    (backup,) = (home / "backup").iterdir()
    for name in ("keys.json", "usage.jsonl", "adapters/support/registration.json"):
        assert (backup / name).is_file(), name

    entries = [e for e in AuditLog(home).entries() if e["action"] == "registry.import_home"]
    assert [e["phase"] for e in entries] == ["intent", "done"]  # recorded before anything was imported
    files = {f["file"]: f["records"] for f in entries[1]["details"]["files"]}
    assert files == {"keys.json": 2, "usage.jsonl": 2, "adapters/support/registration.json": 1}
    assert verify_audit_log(home / "audit.jsonl") == []

    # the adapter is still served: its registration checks out against the stored files
    from loraforge.serve.adapter_cache import read_adapter

    read_adapter(AdapterStore(home).path("support"), reg.weights_sha256, reg.config_sha256)


def test_a_stop_between_import_and_move_imports_nothing_twice(tmp_path: Path, adapter_dirs: dict[str, Path]) -> None:
    home = tmp_path / "home"
    _old_home(home, adapter_dirs["a1"])
    home_registry(home)
    (backup,) = (home / "backup").iterdir()
    shutil.copy(backup / "usage.jsonl", home / "usage.jsonl")  # as if the move had not happened

    registry = open_registry(home)  # a new process
    try:
        from loraforge.serve.home_registry import import_file_home

        assert import_file_home(home, registry) == []
        assert not (home / "usage.jsonl").exists()
        ledger = UsageLedger(home, price_prompt_1k=0, price_completion_1k=0, registry=registry)
        assert ledger.summary("acme")["total"]["requests"] == 2
        with registry.reading() as s:
            assert len(s.scalars(select(Migration)).all()) == 3
    finally:
        registry.close()
    assert len([e for e in AuditLog(home).entries() if e["action"] == "registry.import_home"]) == 2


def test_a_damaged_file_is_named_and_nothing_is_half_imported(tmp_path: Path, adapter_dirs: dict[str, Path]) -> None:
    home = tmp_path / "home"
    _old_home(home, adapter_dirs["a1"])
    (home / "keys.json").write_text('{"keys": [{"id": "x"}]}')
    with pytest.raises(ConfigError, match=r"keys.json is not a valid key file"):
        home_registry(home)
    for name in ("keys.json", "usage.jsonl", "adapters/support/registration.json"):
        assert (home / name).is_file(), name  # nothing moved
    registry = open_registry(home)
    try:
        assert UsageLedger(home, price_prompt_1k=0, price_completion_1k=0, registry=registry).entries("acme") == []
    finally:
        registry.close()


def test_the_cli_works_on_an_old_home_with_the_same_output(tmp_path: Path, adapter_dirs: dict[str, Path]) -> None:
    home = tmp_path / "home"
    _old_home(home, adapter_dirs["a1"])

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "loraforge", *args, "--home", str(home)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    keys = run("keys", "list")
    assert "0badc0de" in keys and "acme" in keys and "deadbeef" in keys and "globex" in keys
    adapters = run("adapters", "list")
    assert "support" in adapters and "acme" in adapters
