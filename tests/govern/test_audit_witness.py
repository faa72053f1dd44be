"""The registry's copy of the audit head: a rollback of both log and head is caught; export for a SIEM."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from typer.testing import CliRunner

from loraforge.govern.audit import verify_audit_log
from loraforge.govern.audit_witness import RegistryWitness, audit_log
from loraforge.serve.home_registry import home_registry


def test_a_rollback_of_log_and_head_together_is_caught_by_the_registry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = home_registry(home)
    log = audit_log(home, registry)
    for i in range(3):
        log.record("cli:ana", "key.create", f"k{i}")
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("audit.jsonl", "audit.head"):
        shutil.copy(home / name, saved / name)
    log.record("cli:ana", "adapter.approve", "v1")
    log.record("cli:ana", "route.deploy", "bot")
    witness = RegistryWitness(registry, log.path)
    assert witness.head()["count"] == 5  # type: ignore[index]
    assert verify_audit_log(log.path, witness=witness.head()) == []

    # whoever can write the home but not the database puts back an earlier, consistent pair of files
    for name in ("audit.jsonl", "audit.head"):
        shutil.copy(saved / name, home / name)
    assert verify_audit_log(log.path) == []  # the files alone agree with each other
    problems = verify_audit_log(log.path, witness=witness.head())
    assert problems == [
        f"{log.path}: the log ends at record 3 but the registry's audit head records 5 entries: "
        "the last 2 record(s) were deleted"
    ]
    runner = CliRunner()
    from loraforge.cli import app

    result = runner.invoke(app, ["audit", "verify", "--home", str(home)])
    assert result.exit_code == 1 and "registry's audit head records 5 entries" in result.output


def test_the_witness_only_moves_forward(tmp_path: Path) -> None:
    registry = home_registry(tmp_path / "home")
    witness = RegistryWitness(registry, tmp_path / "home" / "audit.jsonl")
    witness(4, "d" * 64)
    witness(2, "b" * 64)  # a late writer's older head never moves it back
    assert witness.head()["count"] == 4  # type: ignore[index]


def test_export_since_writes_jsonl_with_the_chain(tmp_path: Path) -> None:
    from loraforge.cli import app

    home = tmp_path / "home"
    log = audit_log(home, home_registry(home))
    log.record("cli:ana", "key.create", "old")
    time.sleep(0.05)
    cut = time.time()
    time.sleep(0.01)  # records carry milliseconds: one within half of one after the cut could round to before it
    log.record("cli:ana", "adapter.approve", "new")
    out = tmp_path / "siem.jsonl"
    result = CliRunner().invoke(app, ["audit", "export", "--since", str(cut), "--out", str(out), "--home", str(home)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["seq"], e["target"]) for e in lines] == [(2, "new")] and len(lines[0]["prev"]) == 64
    everything = CliRunner().invoke(app, ["audit", "export", "--since", "2020-01-01", "--home", str(home)])
    assert [json.loads(x)["target"] for x in everything.output.splitlines()] == ["old", "new"]
    bad = CliRunner().invoke(app, ["audit", "export", "--since", "yesterday", "--home", str(home)])
    assert bad.exit_code == 1 and "give a date" in str(bad.exception)  # main() prints it as one line
