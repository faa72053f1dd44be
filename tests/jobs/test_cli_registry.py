"""``loraforge registry status|upgrade`` as a user runs them: plain answers, no migration chatter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, timeout=120)


def test_status_then_upgrade_then_status(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = _run("registry", "status", "--home", str(home))
    assert missing.returncode == 1 and "none yet" in missing.stderr and "Traceback" not in missing.stderr
    upgraded = _run("registry", "upgrade", "--home", str(home))
    assert upgraded.returncode == 0, upgraded.stderr
    from loraforge.registry.database import head_revision, make_engine

    head = head_revision(make_engine("sqlite://"))
    assert f"revision {head} (newest)" in upgraded.stdout and "Context impl" not in upgraded.stdout + upgraded.stderr
    current = _run("registry", "status", "--home", str(home))
    assert current.returncode == 0 and "(current)" in current.stdout
    assert ((home / "registry.db").stat().st_mode & 0o077) == 0
    unreachable = _run("registry", "status", "--database-url", "postgresql://nobody@127.0.0.1:1/x")
    assert unreachable.returncode == 1 and "cannot open the registry" in unreachable.stderr
