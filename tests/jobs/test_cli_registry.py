"""``loraforge registry status|upgrade`` as a user runs them: plain answers, no migration chatter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


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


def test_no_upgrade_refuses_a_registry_behind_the_code(tmp_path: Path, tiny_model_dir: Path) -> None:
    from loraforge.errors import ConfigError
    from loraforge.registry.database import current_revision, make_engine, upgrade
    from loraforge.serve.config import ServeConfig
    from loraforge.serve.server import build_server

    home = tmp_path / "home"
    home.mkdir()
    engine = make_engine(f"sqlite:///{home / 'registry.db'}")
    upgrade(engine, "0001")  # as an older loraforge left it
    worker = _run("worker", "--no-upgrade", "--exit-when-idle", "--home", str(home))
    assert worker.returncode == 1 and "at revision 0001" in worker.stderr
    assert "loraforge registry upgrade" in worker.stderr
    with pytest.raises(ConfigError, match="at revision 0001"):
        build_server(ServeConfig(base_model=str(tiny_model_dir), upgrade_registry=False), home)
    assert current_revision(engine) == "0001"  # untouched
    upgraded = _run("worker", "--exit-when-idle", "--home", str(home))  # by default, the schema is upgraded
    assert upgraded.returncode == 0, upgraded.stderr
    assert current_revision(engine) != "0001"
    engine.dispose()
