"""The worker: claims, runs, reports, cancels, recovers; never two runs of one job."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from loraforge.jobs.files import FileService
from loraforge.jobs.service import JobService, parse_job_request
from loraforge.jobs.worker import Worker, WorkerSettings
from loraforge.registry.database import Registry, open_registry
from loraforge.registry.schema import Adapter, File, Job
from tests.jobs.conftest import BASE, DECLARED, FakeExecutor, sample_lines, upload, wait_for

FAST = WorkerSettings(heartbeat_s=0.05, stale_after_s=5.0, poll_s=0.02, stop_grace_s=2.0)


def _queue(files: FileService, jobs: JobService, tenant: str = "acme", **body: object) -> str:
    training = upload(files, tenant, sample_lines(20), declaration=DECLARED)["id"]
    return str(jobs.create(tenant, parse_job_request({"model": BASE, "training_file": training, **body}))["id"])


def test_a_job_runs_to_a_served_model_with_events_checkpoints_and_results(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    ident = _queue(
        files, jobs, suffix="care", hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2}
    )
    executor = FakeExecutor(steps=4)
    assert Worker(registry, tmp_path / "home", executor, settings=FAST).run(exit_when_idle=True) == 1
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"] == f"ft:{BASE}:acme:care:{ident.removeprefix('ftjob-')}"
    assert job["trained_tokens"] == 400 and job["finished_at"] is not None
    config = executor.configs[0]
    assert (config["epochs"], config["grad_accum"], config["learning_rate"]) == (3, 4, 2e-3)
    assert config["data"] == str(files.content_path("acme", job["training_file"]))
    messages = [e["message"] for e in reversed(jobs.events("acme", ident, limit=100)["data"])]
    assert messages[-1] == "The job has successfully completed"
    assert "Step 3: training loss=0.6667" in messages and "Checkpoint created at step 4" in messages
    metrics = [e for e in jobs.events("acme", ident, limit=100)["data"] if e["type"] == "metrics"]
    assert {"step", "train_loss", "valid_loss", "full_valid_loss", "train_mean_token_accuracy"} <= set(
        metrics[0]["data"]
    )
    first_step = next(e["data"] for e in reversed(metrics) if e["message"].startswith("Step 1:"))
    assert first_step["total_steps"] == 4 and first_step["train_mean_token_accuracy"] == 0.2
    everything = [e["id"] for e in jobs.events("acme", ident, limit=100)["data"]]
    paged, after = [], None
    while True:  # pages of 5, each after the last of the one before: the same events, in the same order
        chunk = jobs.events("acme", ident, limit=5, after=after)
        paged += [e["id"] for e in chunk["data"]]
        if not chunk["has_more"]:
            break
        after = chunk["last_id"]
    assert paged == everything and len(everything) > 10
    checkpoints = jobs.checkpoints("acme", ident)["data"]
    assert [c["step_number"] for c in checkpoints] == [4, 2]
    later = jobs.checkpoints("acme", ident, limit=1)
    assert later["has_more"] and [
        c["step_number"] for c in jobs.checkpoints("acme", ident, after=later["last_id"])["data"]
    ] == [2]
    assert checkpoints[0]["metrics"]["train_loss"] == 0.5 and checkpoints[0]["metrics"]["valid_loss"] == 0.625
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-4"
    with registry.session() as s:
        result = s.get(File, job["result_files"][0])
        assert result is not None and result.tenant == "acme" and result.purpose == "fine-tune-results"
        assert Path(result.path).read_text().splitlines()[:2] == [
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
            "1,2.0,0.2,,",
        ]
        adapter = s.get(Adapter, job["fine_tuned_model"])
        assert adapter is not None and adapter.tenant == "acme" and adapter.job_id == ident
        assert adapter.lineage["datasets"] == [{"role": "train", "sha256": "d" * 64}]


def test_a_failed_run_fails_the_job_with_its_reason(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    ident = _queue(files, jobs)
    home = tmp_path / "home"
    Worker(registry, home, FakeExecutor(exit_status=1), settings=FAST).run(exit_when_idle=True)
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "failed" and job["fine_tuned_model"] is None
    assert job["error"] == {"code": "training_failed", "message": "the data went away", "param": None}


def test_cancel_stops_a_running_job_and_keeps_its_checkpoints(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    ident = _queue(files, jobs)
    worker = Worker(registry, tmp_path / "home", FakeExecutor(steps=500, step_s=0.02), settings=FAST)
    thread = threading.Thread(target=worker.run, kwargs={"exit_when_idle": True})
    thread.start()
    wait_for(lambda: len(jobs.checkpoints("acme", ident)["data"]) >= 2)
    running = jobs.cancel("acme", ident)
    assert running["status"] == "running" and running["loraforge"]["cancel_requested"]
    asked = time.time()
    thread.join(20)
    assert not thread.is_alive() and time.time() - asked < 5
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None
    kept = jobs.checkpoints("acme", ident)["data"]
    assert kept and all(Path(c["fine_tuned_model_checkpoint"]).name for c in kept)
    with registry.session() as s:
        out = Path(str(s.scalar(select(Job.output_dir).where(Job.id == ident))))
    assert len(list((out / "checkpoints").glob("step-*"))) == len(kept)


def test_a_job_whose_worker_died_resumes_from_its_checkpoint(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    ident = _queue(files, jobs)
    home = tmp_path / "home"
    # a first worker ran two steps (one checkpoint), then died without a word
    first = Worker(registry, home, FakeExecutor(steps=2), settings=FAST, name="dead")
    assert first.claim() == ident
    out = home / "jobs" / ident / "adapter" / "checkpoints" / "step-000002"
    out.mkdir(parents=True)
    with registry.session() as s:
        s.execute(update(Job).where(Job.id == ident).values(heartbeat_at=time.time() - 60))
    executor = FakeExecutor(steps=4)
    second = Worker(registry, home, executor, settings=FAST, name="alive")
    assert second.run(exit_when_idle=True) == 1
    assert executor.resumed == [True] and executor.started[ident] == 1
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "succeeded" and job["loraforge"]["attempts"] == 2
    messages = [e["message"] for e in jobs.events("acme", ident, limit=100)["data"]]
    assert any("worker dead stopped answering" in m and "queued again" in m for m in messages)
    assert "Resuming from the last checkpoint" in messages


def test_a_job_that_keeps_losing_its_worker_fails_with_the_reason(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    ident = _queue(files, jobs)
    settings = WorkerSettings(stale_after_s=5.0, max_attempts=2)
    for attempt in range(2):
        assert Worker(registry, tmp_path, FakeExecutor(), settings=settings, name=f"w{attempt}").claim() == ident
        with registry.session() as s:
            s.execute(update(Job).where(Job.id == ident).values(heartbeat_at=time.time() - 60))
        Worker(registry, tmp_path, FakeExecutor(), settings=settings).recover_stale()
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert "has run 2 times" in job["error"]["message"]


def test_a_worker_that_lost_its_job_stops_the_run(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    ident = _queue(files, jobs)
    worker = Worker(registry, tmp_path, FakeExecutor(steps=500, step_s=0.02), settings=FAST, name="slow")
    assert worker.claim() == ident
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(worker.run_job(ident)))
    thread.start()
    wait_for(lambda: len(jobs.checkpoints("acme", ident)["data"]) >= 1)
    with registry.session() as s:  # another worker took it back (as after a long pause of this one)
        s.execute(update(Job).where(Job.id == ident).values(worker="other"))
    thread.join(10)
    assert result == ["running"]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_racing_workers_run_each_job_exactly_once(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}" if kind == "sqlite" else str(request.getfixturevalue("fresh_postgres_url"))
    home = tmp_path / "home"
    main = open_registry(home, url)
    files = FileService(main, home / "files", max_bytes=1 << 20)
    jobs = JobService(main, files, base_models={BASE: "a" * 64})
    made = [_queue(files, jobs, tenant=f"t{i % 3}") for i in range(10)]
    executor = FakeExecutor(steps=2)
    registries = [open_registry(home, url) for _ in range(4)]
    workers = [Worker(r, home, executor, settings=FAST, name=f"w{i}") for i, r in enumerate(registries)]
    threads = [threading.Thread(target=w.run, kwargs={"exit_when_idle": True}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert dict(executor.started) == dict.fromkeys(made, 1)
    assert {jobs.retrieve(f"t{i % 3}", j)["status"] for i, j in enumerate(made)} == {"succeeded"}
    for r in [*registries, main]:
        r.close()


def test_a_tenant_at_its_running_limit_waits_for_the_others(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    a1, a2 = _queue(files, jobs, tenant="a"), _queue(files, jobs, tenant="a")
    b1 = _queue(files, jobs, tenant="b")
    capped = WorkerSettings(max_running_per_tenant=1)
    assert Worker(registry, tmp_path, FakeExecutor(), settings=capped, name="w1").claim() == a1
    assert Worker(registry, tmp_path, FakeExecutor(), settings=capped, name="w2").claim() == b1
    assert Worker(registry, tmp_path, FakeExecutor(), settings=capped, name="w3").claim() is None
    assert Worker(registry, tmp_path, FakeExecutor(), name="w4").claim() == a2  # no cap: it runs


def test_a_job_that_asks_for_evaluation_carries_the_gate_verdict(
    files: FileService, jobs: JobService, registry: Registry, tmp_path: Path
) -> None:
    ident = _queue(files, jobs, loraforge={"evaluate": ["task", "safety"]})
    Worker(registry, tmp_path, FakeExecutor(verdict="FAIL"), settings=FAST).run(exit_when_idle=True)
    job = jobs.retrieve("acme", ident)
    assert job["status"] == "succeeded"  # a failed gate is a result: the model exists, with its verdict
    assert job["loraforge"]["evaluation"]["verdict"] == "FAIL"
    messages = [e["message"] for e in jobs.events("acme", ident, limit=100)["data"]]
    assert "Evaluation finished: the release gate says FAIL" in messages
    assert "Evaluating the adapter against its base model: task, safety" in messages
    assert jobs.list("acme")["data"][0]["loraforge"]["evaluation"]["verdict"] == "FAIL"


def test_the_estimated_finish_is_the_steps_left_at_the_pace_so_far() -> None:
    from loraforge.jobs.worker import estimated_finish

    assert estimated_finish({"step": 5, "total_steps": 20, "elapsed_s": 10.0}, 100.0) == 130.0
    assert estimated_finish({"step": 20, "total_steps": 20, "elapsed_s": 40.0}, 100.0) == 100.0
    assert estimated_finish({"step": 5, "elapsed_s": 10.0}, 100.0) is None  # a run that did not say its length
