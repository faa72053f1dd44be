"""The worker: claims queued jobs from the registry, runs them, and reports what happens.

One job at a time per worker; any number of workers share a registry:

- **Claim** is one atomic ``UPDATE … WHERE status = 'queued'`` (``RETURNING`` the job): two workers
  never get the same job, on SQLite or PostgreSQL. A tenant at ``max_running_per_tenant`` waits.
- **Run**: the job's training config is written to ``HOME/jobs/<id>/train.yaml`` and handed to the
  executor; while it runs the worker beats a heartbeat into the job's row, turns new lines of
  ``metrics.jsonl`` into events and new checkpoints into checkpoint rows, and stops the run when a
  cancel is requested (the last checkpoint stays).
- **Crash safety**: a running job whose heartbeat is older than ``stale_after_s`` (its worker or the
  machine died) goes back to the queue and resumes from its last checkpoint, or fails with the reason
  after ``max_attempts``. The job directory's lock, held by the worker and inherited by the training
  process, keeps a second worker off a job whose training still runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from loraforge.files import private_directory, sha256_file, write_text_atomic
from loraforge.govern.release import register_step
from loraforge.jobs.executor import Executor, Run
from loraforge.jobs.results import metrics_csv, openai_metrics, read_metrics
from loraforge.jobs.service import add_event, fine_tuned_model_name
from loraforge.models.manifest import AdapterManifest
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter, Checkpoint, Evaluation, File, Job

DEFAULT_LEARNING_RATE = 1e-3  # TrainConfig's; learning_rate_multiplier scales it
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class WorkerSettings:
    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0  # a running job whose heartbeat is older is taken back
    poll_s: float = 1.0
    max_attempts: int = 3  # runs of one job (the first and its resumptions) before it fails
    max_running_per_tenant: int | None = None
    stop_grace_s: float = 10.0
    checkpoint_every: int = 10


def train_config(job: Job, files: dict[str, str], output: Path, settings: WorkerSettings) -> dict[str, Any]:
    """The ``loraforge train`` config of a job: OpenAI's hyperparameters mapped onto loraforge's options.

    ``n_epochs`` → ``epochs``; ``batch_size`` → packed rows per optimizer step (``grad_accum``);
    ``learning_rate_multiplier`` × loraforge's default learning rate; ``"auto"`` keeps loraforge's choice.
    """
    hyper = (job.method.get("supervised") or {}).get("hyperparameters") or {}
    ext = job.extensions
    config: dict[str, Any] = {
        "data": files[job.training_file],
        "output": str(output),
        "base_model": (job.config or {}).get("base_model", job.model),
        "seed": job.seed,
        "lora_r": ext.get("lora_r", 16),
        "lora_alpha": ext.get("lora_alpha", 32.0),
        "lora_dropout": ext.get("lora_dropout", 0.0),
        "target_modules": ext.get("target_modules", "all-linear"),
        "pii": ext.get("pii", "redact"),
        "dedupe": ext.get("dedupe", "exact"),
        "checkpoint_every": settings.checkpoint_every,
    }
    if job.validation_file:
        config["validation"] = files[job.validation_file]
    if ext.get("max_steps"):
        config["max_steps"] = ext["max_steps"]
    elif hyper.get("n_epochs", "auto") != "auto":
        config["epochs"] = hyper["n_epochs"]
    if hyper.get("batch_size", "auto") != "auto":
        config["grad_accum"] = hyper["batch_size"]
    if hyper.get("learning_rate_multiplier", "auto") != "auto":
        config["learning_rate"] = DEFAULT_LEARNING_RATE * float(hyper["learning_rate_multiplier"])
    return config


def estimated_finish(record: dict[str, Any], now: float) -> float | None:
    """When the run should end, from its latest training record: the steps left at the pace so far
    (``elapsed_s`` counts training time across resumes); None when the record cannot tell."""
    step, total, elapsed = record.get("step"), record.get("total_steps"), record.get("elapsed_s")
    if not (isinstance(step, int) and step > 0 and isinstance(total, int) and isinstance(elapsed, int | float)):
        return None
    return now + max(0, total - step) * float(elapsed) / step


class Worker:
    def __init__(
        self,
        registry: Registry,
        home: Path,
        executor: Executor,
        *,
        settings: WorkerSettings | None = None,
        name: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.home = home
        self.executor = executor
        self.settings = settings or WorkerSettings()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.say = log or (lambda _msg: None)

    # --- the loop --------------------------------------------------------------------------------
    def run(
        self, *, max_jobs: int | None = None, stop: threading.Event | None = None, exit_when_idle: bool = False
    ) -> int:
        """Claim and run jobs until ``stop`` is set, ``max_jobs`` have run, or (``exit_when_idle``) none is queued."""
        done = 0
        stop = stop or threading.Event()
        while not stop.is_set() and (max_jobs is None or done < max_jobs):
            self.recover_stale()
            job_id = self.claim()
            if job_id is None:
                if exit_when_idle:
                    break
                stop.wait(self.settings.poll_s)
                continue
            self.run_job(job_id, stop)
            done += 1
        return done

    def recover_stale(self) -> list[str]:
        """Put running jobs whose worker stopped answering back in the queue, or fail them; their ids."""
        limit = time.time() - self.settings.stale_after_s
        taken: list[str] = []
        with self.registry.session() as s:
            for job in s.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < limit)):
                lost = f"worker {job.worker} stopped answering (no heartbeat for {self.settings.stale_after_s:.0f} s)"
                if job.cancel_requested:
                    job.status, job.finished_at, job.worker = "cancelled", time.time(), None
                    add_event(s, job.id, f"{lost}; the job was being cancelled and is now cancelled")
                elif job.attempts >= self.settings.max_attempts:
                    job.status, job.finished_at, job.worker = "failed", time.time(), None
                    job.error = {
                        "code": "worker_lost",
                        "message": f"{lost}, and the job has run {job.attempts} times; it is not retried again",
                        "param": None,
                    }
                    add_event(s, job.id, job.error["message"], level="error")
                else:
                    job.status, job.worker, job.heartbeat_at = "queued", None, None
                    add_event(
                        s, job.id, f"{lost}; the job is queued again and resumes from its last checkpoint", level="warn"
                    )
                taken.append(job.id)
        return taken

    def claim(self) -> str | None:
        """Take the oldest queued job (of a tenant under its running limit) atomically; its id, or None."""
        now = time.time()
        candidates = select(Job.id).where(Job.status == "queued")
        cap = self.settings.max_running_per_tenant
        if cap:
            busy = select(Job.tenant).where(Job.status == "running").group_by(Job.tenant).having(func.count() >= cap)
            candidates = candidates.where(Job.tenant.not_in(busy))
        oldest = candidates.order_by(Job.created_at, Job.id).limit(1).scalar_subquery()
        for _ in range(20):
            try:
                with self.registry.session() as s:
                    taken = s.execute(
                        update(Job)
                        .where(Job.id == oldest, Job.status == "queued")
                        .values(
                            status="running",
                            worker=self.name,
                            heartbeat_at=now,
                            attempts=Job.attempts + 1,
                            started_at=func.coalesce(Job.started_at, now),
                        )
                        .returning(Job.id)
                    ).scalar()
                    if taken is None:
                        if s.scalar(candidates.limit(1)) is None:
                            return None
                        continue  # another worker took it between the two reads: try the next one
                    add_event(s, taken, f"Fine-tuning job started by worker {self.name}")
                    return str(taken)
            except OperationalError:  # SQLite busy beyond its timeout: try again
                time.sleep(0.05)
        return None

    # --- one job ---------------------------------------------------------------------------------
    def run_job(self, job_id: str, stop: threading.Event | None = None) -> str:
        """Run a claimed job to its end; its final status (or "running" if this worker lost it)."""
        workdir = private_directory(self.home / "jobs" / job_id)
        lock = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._requeue(job_id, "its previous training process is still running")
            return self._run_locked(job_id, workdir, lock, stop or threading.Event())
        finally:
            os.close(lock)

    def _run_locked(self, job_id: str, workdir: Path, lock: int, stop: threading.Event) -> str:
        output = workdir / "adapter"
        with self.registry.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            paths = {
                f.id: f.path
                for f in s.scalars(
                    select(File).where(File.id.in_([x for x in (job.training_file, job.validation_file) if x]))
                )
            }
            config = train_config(job, paths, output, self.settings)
            job.config, job.output_dir = config, str(output)
            resume = (output / "checkpoints").is_dir() and any(
                STEP_DIR.match(p.name) for p in (output / "checkpoints").iterdir()
            )
            name = fine_tuned_model_name(job.model, job.tenant, job.suffix, job.id)
            job_extensions = dict(job.extensions)
            add_event(s, job_id, "Resuming from the last checkpoint" if resume else "Training started")
        config_path = workdir / "train.yaml"
        write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
        args = ["train", "--config", str(config_path), *(["--resume"] if resume else [])]
        seen: dict[str, int] = {"train": 0, "eval": 0, "checkpoint": 0}
        run = self.executor.start(args, workdir, keep_fds=(lock,))
        outcome = self._wait(job_id, run, stop, lambda: self._report_progress(job_id, output, name, seen))
        if outcome != "done":
            return self._interrupted(job_id, outcome)
        status = run.poll()
        assert status is not None
        if status != 0 or not (output / "manifest.json").is_file():
            return self._fail(job_id, run, status)
        suites = [str(x) for x in job_extensions.get("evaluate") or []]
        if suites:
            with self.registry.session() as s:
                add_event(s, job_id, f"Evaluating the adapter against its base model: {', '.join(suites)}")
            evaluation = self.executor.start(
                ["eval", "--adapter", str(output), "--suites", ",".join(suites)], workdir, keep_fds=(lock,)
            )
            outcome = self._wait(job_id, evaluation, stop, lambda: None)
            if outcome != "done":
                return self._interrupted(job_id, outcome)
            self._record_evaluation(job_id, evaluation)
        return self._finish(job_id, output, name)

    def _wait(self, job_id: str, run: Run, stop: threading.Event, progress: Callable[[], None]) -> str:
        """Watch ``run`` to its end, beating the heartbeat: "done", "lost", "cancel" or "stopped"."""
        last_beat = 0.0
        while True:
            finished = run.poll() is not None
            progress()
            if finished:
                return "done"
            now = time.time()
            if now - last_beat >= self.settings.heartbeat_s:
                last_beat = now
                beat = self._heartbeat(job_id)
                if beat != "ok" or stop.is_set():
                    run.stop(self.settings.stop_grace_s)
                    progress()
                    return beat if beat != "ok" else "stopped"
            time.sleep(min(self.settings.poll_s, self.settings.heartbeat_s))

    def _interrupted(self, job_id: str, outcome: str) -> str:
        if outcome == "lost":
            self.say(f"{job_id}: taken back by another worker; stopped")
            return "running"
        if outcome == "cancel":
            return self._end(job_id, "cancelled", "Job cancelled; its last checkpoint is kept")
        return self._requeue(job_id, f"worker {self.name} was stopped")

    def _record_evaluation(self, job_id: str, run: Run) -> None:
        """The gate's verdict from the adapter manifest, as an event (the evaluation row comes with the adapter)."""
        status = run.poll()
        with self.registry.session() as s:
            if status in (0, 3, 4):
                verdict = {0: "PASS", 3: "FAIL", 4: "INCONCLUSIVE"}[int(status)]
                add_event(s, job_id, f"Evaluation finished: the release gate says {verdict}")
            else:
                tail = run.log_tail(5).replace(str(self.home), "HOME")
                add_event(
                    s, job_id, f"Evaluation could not run (the model is kept, without a verdict): {tail}", level="warn"
                )

    def _heartbeat(self, job_id: str) -> str:
        """ "ok", "cancel" (a cancel was requested) or "lost" (the job is no longer this worker's)."""
        with self.registry.session() as s:
            mine = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == self.name, Job.status == "running")
                .values(heartbeat_at=time.time())
                .returning(Job.id)
            ).scalar()
            if not mine:
                return "lost"
            return "cancel" if s.scalar(select(Job.cancel_requested).where(Job.id == job_id)) else "ok"

    def _report_progress(self, job_id: str, output: Path, name: str, seen: dict[str, int]) -> None:
        """New metrics lines → events; new complete checkpoints → checkpoint rows."""
        records = read_metrics(output / "metrics.jsonl")
        fresh = [r for r in records if r.get("kind") in ("train", "eval") and r["step"] > seen[r["kind"]]]
        steps = (
            sorted(int(m.group(1)) for p in (output / "checkpoints").glob("step-*") if (m := STEP_DIR.match(p.name)))
            if (output / "checkpoints").is_dir()
            else []
        )
        new_steps = [n for n in steps if n > seen["checkpoint"]]
        if not fresh and not new_steps:
            return
        with self.registry.session() as s:
            for r in fresh:
                seen[r["kind"]] = r["step"]
                metrics = openai_metrics(records, r["step"])
                if r["kind"] == "train":
                    if r.get("total_steps"):
                        metrics["total_steps"] = r["total_steps"]  # as OpenAI's metrics events carry it
                    add_event(
                        s, job_id, f"Step {r['step']}: training loss={r['loss']:.4f}", kind="metrics", data=metrics
                    )
                else:
                    add_event(
                        s,
                        job_id,
                        f"Step {r['step']}: validation loss={r['val_loss']:.4f}",
                        kind="metrics",
                        data=metrics,
                    )
            trained_records = [r for r in records if r.get("kind") == "train"]
            trained = sum(r.get("tokens", 0) for r in trained_records)
            values: dict[str, Any] = {"trained_tokens": trained}
            if trained_records:
                values["estimated_finish"] = estimated_finish(trained_records[-1], time.time())
            s.execute(update(Job).where(Job.id == job_id).values(**values))
            for step in new_steps:
                seen["checkpoint"] = step
                exists = s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id, Checkpoint.step == step))
                if exists is None:
                    s.add(
                        Checkpoint(
                            id=f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}",
                            job_id=job_id,
                            step=step,
                            metrics=openai_metrics(records, step),
                            path=str(output / "checkpoints" / f"step-{step:06d}"),
                            fine_tuned_model_checkpoint=f"{name}:ckpt-step-{step}",
                            created_at=time.time(),
                        )
                    )
                    add_event(s, job_id, f"Checkpoint created at step {step}")

    def _finish(self, job_id: str, output: Path, name: str) -> str:
        manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
        record = AdapterManifest.from_json(manifest, output / "manifest.json")
        now = time.time()
        with self.registry.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            records = read_metrics(output / "metrics.jsonl")
            result_path = output / "results.csv"
            write_text_atomic(result_path, metrics_csv(records))
            result = File(
                id=f"file-{job_id.removeprefix('ftjob-')}-results",
                tenant=job.tenant,
                filename=f"{job_id}-results.csv",
                purpose="fine-tune-results",
                bytes=result_path.stat().st_size,
                sha256="",
                path=str(result_path),
                status="processed",
                created_at=now,
            )
            result.sha256 = sha256_file(result_path)
            s.merge(result)
            s.merge(
                Adapter(
                    name=name,
                    tenant=job.tenant,
                    base_model=manifest["base_model"]["name"],
                    base_sha256=manifest["base_model"].get("sha256", ""),
                    weights_sha256=manifest["checksums"]["adapter_model.safetensors"],
                    config_sha256=manifest["checksums"]["adapter_config.json"],
                    source=str(output),
                    job_id=job_id,
                    lineage=record.lineage(),
                    governance_flags=[f["flag"] for f in record.flags()],
                    added_at=now,
                    created_by=job.created_by,
                )
            )
            s.flush()
            evaluation = manifest.get("evaluation")
            evaluated = isinstance(evaluation, dict) and bool(evaluation.get("verdict"))
            eval_id = f"eval-{job_id.removeprefix('ftjob-')}"
            if isinstance(evaluation, dict) and evaluated:
                report = evaluation.get("report") or {}
                s.merge(
                    Evaluation(
                        id=eval_id,
                        adapter=name,
                        verdict=str(evaluation["verdict"]),
                        policy=evaluation.get("policy") or {},
                        headline=evaluation.get("headline") or {},
                        report_path=report.get("html"),
                        created_at=now,
                    )
                )
            registered = s.get(Adapter, name)
            assert registered is not None
            verdict = str(evaluation["verdict"]) if isinstance(evaluation, dict) and evaluated else None
            register_step(s, registered, verdict, actor=f"worker:{self.name}", evaluation_id=eval_id)
            job.status, job.finished_at, job.worker = "succeeded", now, None
            job.fine_tuned_model, job.result_files = name, [result.id]
            job.trained_tokens = int((manifest.get("actual") or {}).get("tokens") or job.trained_tokens or 0)
            add_event(s, job_id, f"New fine-tuned model created: {name}")
            add_event(s, job_id, "The job has successfully completed")
        return "succeeded"

    def _fail(self, job_id: str, run: Run, status: int) -> str:
        lines = [ln for ln in run.log_tail(40).splitlines() if ln.strip()]
        # the CLI's own message ("error: …" and the lines after it), else the last line of output
        start = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("error: ")), None)
        if start is not None:
            message = "\n".join([lines[start].removeprefix("error: "), *lines[start + 1 :]])
        else:
            message = lines[-1] if lines else f"training exited with status {status}"
        message = message.replace(str(self.home), "HOME")  # the server's paths are not the tenant's business
        with self.registry.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.finished_at, job.worker = "failed", time.time(), None
            job.error = {"code": "training_failed", "message": message, "param": None}
            add_event(s, job_id, f"Training failed: {message}", level="error")
        return "failed"

    def _end(self, job_id: str, status: str, message: str) -> str:
        with self.registry.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.finished_at, job.worker = status, time.time(), None
            add_event(s, job_id, message)
        return status

    def _requeue(self, job_id: str, why: str) -> str:
        with self.registry.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == self.name)
                .values(status="queued", worker=None, heartbeat_at=None)
            )
            add_event(s, job_id, f"The job is queued again ({why}); it resumes from its last checkpoint", level="warn")
        return "queued"
