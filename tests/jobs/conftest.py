"""A registry in a temporary home, the file and job services on it, and a fake executor for the worker.

The fake executor writes what ``loraforge train`` writes (``metrics.jsonl`` line by line, complete
checkpoint directories, ``manifest.json`` last) on a thread, fast, so the worker's logic (claims,
heartbeats, cancels, failures, recovery) is tested without training; a few tests run the real one.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraforge.jobs.files import Declaration, FileService
from loraforge.jobs.service import JobService
from loraforge.registry.database import Registry, open_registry

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "loraforge" / "samples"
BASE = "smollm2-135m-instruct"
DECLARED = Declaration("CC0-1.0", "Brightpath Bikes", False)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = open_registry(tmp_path / "home", f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


@pytest.fixture
def files(registry: Registry, tmp_path: Path) -> FileService:
    return FileService(registry, tmp_path / "home" / "files", max_bytes=1 << 20)


@pytest.fixture
def jobs(registry: Registry, files: FileService) -> JobService:
    return JobService(registry, files, base_models={BASE: "a" * 64})


def upload(files: FileService, tenant: str, text: str | bytes, name: str = "train.jsonl", **kw: Any) -> dict[str, Any]:
    data = text.encode() if isinstance(text, str) else text
    return files.create(tenant, name, "fine-tune", [data[i : i + 1000] for i in range(0, len(data), 1000)], **kw)


def sample_lines(n: int) -> str:
    return "".join((SAMPLES / "support.jsonl").read_text().splitlines(keepends=True)[:n])


class FakeRun:
    """Writes a training run's files over ``steps`` steps of ``step_s`` seconds each."""

    def __init__(self, output: Path, *, steps: int, step_s: float, exit_status: int, resume: bool) -> None:
        self.output, self.steps, self.step_s, self.exit_status = output, steps, step_s, exit_status
        self.stopped = threading.Event()
        self.status: int | None = None
        self.start_step = 0
        if resume:
            done = sorted((output / "checkpoints").glob("step-*"))
            self.start_step = int(done[-1].name.split("-")[1]) if done else 0
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        out = self.output
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            for step in range(self.start_step + 1, self.steps + 1):
                if self.stopped.wait(self.step_s):
                    self.status = -15
                    return
                record = {"kind": "train", "step": step, "total_steps": self.steps, "loss": 2.0 / step}
                record |= {"accuracy": step / (self.steps + 1), "tokens": 100, "elapsed_s": step * self.step_s}
                f.write(json.dumps(record) + "\n")
                f.flush()
                if step % 2 == 0:
                    f.write(json.dumps({"kind": "eval", "step": step, "val_loss": 2.5 / step}) + "\n")
                    f.flush()
                    (out / "checkpoints" / f"step-{step:06d}").mkdir()
        if self.exit_status == 0:
            (out / "manifest.json").write_text(
                json.dumps(
                    {
                        "base_model": {"name": BASE, "sha256": "a" * 64},
                        "checksums": {"adapter_model.safetensors": "b" * 64, "adapter_config.json": "c" * 64},
                        "datasets": [{"role": "train", "sha256": "d" * 64}],
                        "governance_flags": [],
                        "actual": {"tokens": 100 * self.steps},
                    }
                )
            )
        else:
            (out / "train.log").write_text("error: the data went away\n")
        self.status = self.exit_status

    def poll(self) -> int | None:
        return self.status

    def stop(self, grace_s: float) -> int:
        self.stopped.set()
        self.thread.join(grace_s)
        return self.status if self.status is not None else -9

    def log_tail(self, lines: int = 20) -> str:
        log = self.output / "train.log"
        return log.read_text() if log.exists() else ""


class FakeEvaluation:
    """``loraforge eval``: records a verdict in the adapter's manifest; exit 0 (PASS) or 3 (FAIL)."""

    def __init__(self, adapter: Path, verdict: str) -> None:
        manifest = json.loads((adapter / "manifest.json").read_text())
        manifest["evaluation"] = {"verdict": verdict, "policy": {"name": "default"}, "headline": {"task.rouge_l": {}}}
        (adapter / "manifest.json").write_text(json.dumps(manifest))
        self.status = {"PASS": 0, "FAIL": 3}[verdict]

    def poll(self) -> int | None:
        return self.status

    def stop(self, grace_s: float) -> int:
        return self.status

    def log_tail(self, lines: int = 20) -> str:
        return ""


class FakeExecutor:
    def __init__(self, *, steps: int = 4, step_s: float = 0.01, exit_status: int = 0, verdict: str = "PASS") -> None:
        self.steps, self.step_s, self.exit_status, self.verdict = steps, step_s, exit_status, verdict
        self.started: Counter[str] = Counter()
        self.configs: list[dict[str, Any]] = []
        self.resumed: list[bool] = []
        self.lock = threading.Lock()

    def start(self, args: Sequence[str], workdir: Path, *, keep_fds: Sequence[int] = ()) -> Any:
        if args[0] == "eval":
            return FakeEvaluation(Path(args[args.index("--adapter") + 1]), self.verdict)
        cfg = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
        resume = "--resume" in args
        with self.lock:
            self.started[workdir.name] += 1
            self.configs.append(cfg)
            self.resumed.append(resume)
        out = Path(cfg["output"])
        out.mkdir(parents=True, exist_ok=True)
        return FakeRun(out, steps=self.steps, step_s=self.step_s, exit_status=self.exit_status, resume=resume)


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
