"""The worker with the real executor: ``loraforge train`` as a subprocess on the tiny model."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sqlalchemy import select

from loraforge.jobs.executor import LocalExecutor
from loraforge.jobs.files import FileService
from loraforge.jobs.service import JobService, parse_job_request
from loraforge.jobs.worker import Worker, WorkerSettings
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter, Job
from tests.jobs.conftest import DECLARED, sample_lines, upload

SETTINGS = WorkerSettings(heartbeat_s=0.2, poll_s=0.1, stop_grace_s=5.0, checkpoint_every=2)


def _services(registry: Registry, files: FileService, tiny_model_dir: Path) -> JobService:
    return JobService(registry, files, base_models={str(tiny_model_dir): "tiny"})


def test_a_job_trains_a_real_adapter(
    registry: Registry, files: FileService, tiny_model_dir: Path, tmp_path: Path
) -> None:
    jobs = _services(registry, files, tiny_model_dir)
    training = upload(files, "acme", sample_lines(40), declaration=DECLARED)["id"]
    body = {"model": str(tiny_model_dir), "training_file": training, "loraforge": {"max_steps": 4, "lora_r": 4}}
    ident = jobs.create("acme", parse_job_request(body))["id"]
    home = tmp_path / "home"
    Worker(registry, home, LocalExecutor(home, threads=1), settings=SETTINGS).run(exit_when_idle=True)
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "succeeded", job["error"]
    # a checkpoint every 2 steps; the last step is the adapter itself
    assert [c["step_number"] for c in jobs.checkpoints("acme", ident)["data"]] == [2]
    with registry.session() as s:
        adapter = s.scalar(select(Adapter).where(Adapter.job_id == ident))
        assert adapter is not None
        assert (Path(adapter.source) / "adapter_model.safetensors").is_file()
        assert adapter.lineage["licensing"]["ok"] is True  # the declared licence reached training
        assert adapter.lineage["config"]["lora_r"] == 4


def test_a_failing_training_reports_the_cli_error_without_server_paths(
    registry: Registry, files: FileService, tiny_model_dir: Path, tmp_path: Path
) -> None:
    jobs = _services(registry, files, tiny_model_dir)
    training = upload(files, "acme", sample_lines(40), declaration=DECLARED)["id"]
    body = {"model": str(tiny_model_dir), "training_file": training, "loraforge": {"max_steps": 2}}
    ident = jobs.create("acme", parse_job_request(body))["id"]
    os.remove(files.content_path("acme", training))  # the data disappears under the job
    home = tmp_path / "home"
    Worker(registry, home, LocalExecutor(home, threads=1), settings=SETTINGS).run(exit_when_idle=True)
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "failed" and job["error"]["code"] == "training_failed"
    assert "no such file" in job["error"]["message"] and str(home) not in job["error"]["message"]


def test_the_training_process_dies_with_its_worker(
    registry: Registry, files: FileService, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Linux's parent-death signal: no orphaned training survives a killed worker to race its resumption."""
    import multiprocessing

    jobs = _services(registry, files, tiny_model_dir)
    training = upload(files, "acme", sample_lines(40), declaration=DECLARED)["id"]
    body = {"model": str(tiny_model_dir), "training_file": training, "loraforge": {"max_steps": 400}}
    ident = jobs.create("acme", parse_job_request(body))["id"]
    home = tmp_path / "home"
    url = str(registry.engine.url)

    ctx = multiprocessing.get_context("spawn")
    worker = ctx.Process(target=_work, args=(url, str(home)))
    worker.start()
    deadline = time.time() + 120
    log = home / "jobs" / ident / "train.log"
    while not (log.exists() and "step" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    with registry.session() as s:
        assert s.scalar(select(Job.status).where(Job.id == ident)) == "running"
    children = _children(worker.pid)
    assert children, "the training process was not found"
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    deadline = time.time() + 10
    while any(_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)


def _work(url: str, home: str) -> None:
    from loraforge.registry.database import open_registry

    registry = open_registry(Path(home), url)
    Worker(registry, Path(home), LocalExecutor(Path(home), threads=1), settings=SETTINGS).run(exit_when_idle=True)


def _children(pid: int | None) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_of_the_worker_mid_job_then_a_new_worker_resumes_it_to_the_same_adapter(
    registry: Registry, files: FileService, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`loraforge worker` killed with SIGKILL after a checkpoint; another worker takes the job back when its
    heartbeat times out and resumes it: the adapter equals an uninterrupted run's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    jobs = _services(registry, files, tiny_model_dir)
    training = upload(files, "acme", sample_lines(40), declaration=DECLARED)["id"]
    body = {
        "model": str(tiny_model_dir),
        "training_file": training,
        "seed": 7,
        "loraforge": {"max_steps": 30, "lora_r": 4},
    }
    interrupted = jobs.create("acme", parse_job_request(body))["id"]
    home = tmp_path / "home"
    url = str(registry.engine.url)
    killed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraforge",
            "worker",
            "--home",
            str(home),
            "--database-url",
            url,
            "--exit-when-idle",
            "--threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while not jobs.checkpoints("acme", interrupted)["data"] and time.time() < deadline:
        time.sleep(0.1)
    assert jobs.checkpoints("acme", interrupted)["data"], "no checkpoint before the deadline"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    assert jobs.retrieve("acme", interrupted)["status"] == "running"  # nobody said otherwise: the heartbeat will

    settings = WorkerSettings(heartbeat_s=0.2, poll_s=0.1, stop_grace_s=5.0, checkpoint_every=2, stale_after_s=1.0)
    time.sleep(1.5)
    Worker(registry, home, LocalExecutor(home, threads=1), settings=settings).run(exit_when_idle=True)
    resumed = jobs.retrieve("acme", interrupted)
    assert resumed["status"] == "succeeded", resumed["error"]
    assert resumed["loraforge"]["attempts"] == 2
    messages = [e["message"] for e in jobs.events("acme", interrupted, limit=100)["data"]]
    assert "Resuming from the last checkpoint" in messages

    straight = jobs.create("acme", parse_job_request(body))["id"]
    Worker(registry, home, LocalExecutor(home, threads=1), settings=settings).run(exit_when_idle=True)
    assert jobs.retrieve("acme", straight)["status"] == "succeeded"
    a = load_file(str(home / "jobs" / interrupted / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(home / "jobs" / straight / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
