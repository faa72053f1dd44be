"""`loraforge keys …` and `loraforge adapters …` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loraforge.govern.audit import verify_audit_log
from loraforge.serve.keys import hash_key


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, timeout=300)


def test_keys_and_adapters_commands(tmp_path: Path, adapter_dirs: dict[str, Path]) -> None:
    home = str(tmp_path / "home")
    created = _run("keys", "create", "--tenant", "acme", "--role", "admin", "--home", home)
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[0]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "home").glob("registry.db*"))
    assert key.startswith("lf-") and key.encode() not in stored and hash_key(key).encode() in stored
    listed = _run("keys", "list", "--home", home)
    assert "acme" in listed.stdout and "admin" in listed.stdout and key not in listed.stdout

    both = _run(
        "adapters", "add", str(adapter_dirs["a1"]), "--name", "x", "--tenant", "acme", "--public", "--home", home
    )
    assert both.returncode == 1 and "exactly one of --tenant NAME or --public" in both.stderr
    added = _run("adapters", "add", str(adapter_dirs["a1"]), "--name", "support", "--tenant", "acme", "--home", home)
    assert added.returncode == 0, added.stderr
    assert "registered support" in added.stdout
    assert "support" in _run("adapters", "list", "--home", home).stdout
    missing = _run("adapters", "add", str(tmp_path / "nothing"), "--name", "y", "--public", "--home", home)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr

    key_id = created.stdout.split("key id ")[1].split()[0]
    assert _run("keys", "revoke", key_id, "--home", home).returncode == 0
    assert _run("adapters", "remove", "support", "--home", home).returncode == 0
    audit = tmp_path / "home" / "audit.jsonl"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["action"] for r in records if r["phase"] == "done"] == [
        "key.create",
        "adapter.add",
        "key.revoke",
        "adapter.remove",
    ]
    assert [(r["action"], r["target"]) for r in records if r["phase"] == "failed"] == [("adapter.add", "y")]
    assert key not in audit.read_text()
    assert verify_audit_log(audit) == []
