"""Files and fine-tuning jobs through the real ``openai`` SDK against a running server, and a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from loraforge.govern.audit import AuditLog
from loraforge.jobs.executor import LocalExecutor
from loraforge.jobs.worker import Worker, WorkerSettings
from loraforge.registry.database import open_registry
from loraforge.registry.schema import Adapter
from loraforge.serve.keys import KeyStore
from tests.jobs.conftest import sample_lines
from tests.serve.conftest import Running, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """A server of its own: the models these jobs make must not show in the shared server's listings."""
    yield from start_server(
        tmp_path_factory.mktemp("jobs-home"),
        tiny_model_dir,
        max_batch_size=4,
        default_declarations={"tenant-b": {"license": "CC-BY-4.0", "owner": "Tenant B", "personal_data": False}},
    )


DECLARE = {"license": "CC0-1.0", "owner": "Brightpath Bikes", "personal_data": "false"}


def _client(server: Running, who: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys[who], max_retries=0)


def _upload(client: openai.OpenAI, text: str, **extra: Any) -> Any:
    return client.files.create(
        file=("train.jsonl", text.encode()), purpose="fine-tune", extra_body={**DECLARE, **extra}
    )


def test_the_fine_tuning_flow_with_the_openai_sdk(server: Running, tmp_path: Path) -> None:
    a, b = _client(server, "a"), _client(server, "b")
    uploaded = _upload(a, sample_lines(40))
    assert uploaded.status == "processed", uploaded.status_details
    assert a.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert a.files.content(uploaded.id).read() == sample_lines(40).encode()

    job = a.fine_tuning.jobs.create(
        model=server.engine.model_id,
        training_file=uploaded.id,
        suffix="care",
        metadata={"team": "support"},
        extra_body={"loraforge": {"max_steps": 4, "lora_r": 4}},
    )
    assert job.status == "queued" and job.model == server.engine.model_id
    other = a.fine_tuning.jobs.create(model=server.engine.model_id, training_file=uploaded.id)
    assert a.fine_tuning.jobs.cancel(other.id).status == "cancelled"

    registry = open_registry(server.home)
    settings = WorkerSettings(heartbeat_s=0.2, poll_s=0.1, checkpoint_every=2)
    try:
        Worker(registry, server.home, LocalExecutor(server.home, threads=1), settings=settings).run(exit_when_idle=True)
    finally:
        registry.close()

    done = a.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.fine_tuned_model.startswith(f"ft:{server.engine.model_id}:tenant-a:care:")
    assert done.trained_tokens and done.result_files
    events = list(a.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].message == "The job has successfully completed"
    assert any(e.type == "metrics" for e in events)
    checkpoints = list(a.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [2]
    assert checkpoints[0].metrics.train_loss is not None
    assert 0.0 <= (checkpoints[0].metrics.train_mean_token_accuracy or -1.0) <= 1.0
    results = a.files.content(done.result_files[0]).read().decode()
    assert results.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [j.id for j in a.fine_tuning.jobs.list(metadata={"team": "support"})] == [job.id]

    # uploads and jobs are audited; the job's model is credited to the key that asked for it
    done_actions = {(e["action"], e["target"]) for e in AuditLog(server.home).entries() if e["phase"] == "done"}
    assert {("file.upload", "train.jsonl"), ("job.create", server.engine.model_id)} <= done_actions
    assert ("job.cancel", other.id) in done_actions
    asker = KeyStore(server.home).authenticate(server.keys["a"])
    assert asker is not None
    reader = open_registry(server.home)
    try:
        with reader.reading() as s:
            row = s.get(Adapter, done.fine_tuned_model)
            assert row is not None and (row.created_by or {}).get("key") == asker.id
            assert row.state in ("draft", "evaluated")
    finally:
        reader.close()

    # the job's model is served to its tenant at once, and to nobody else
    model = done.fine_tuned_model
    answer = a.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.model == model and answer.choices[0].message.content is not None
    assert model in {m.id for m in a.models.list()} and model not in {m.id for m in b.models.list()}
    with pytest.raises(openai.NotFoundError):
        b.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)

    # another tenant: nothing of tenant-a exists for it, by any endpoint
    for call in (
        lambda: b.files.retrieve(uploaded.id),
        lambda: b.files.content(uploaded.id),
        lambda: b.files.delete(uploaded.id),
        lambda: b.fine_tuning.jobs.retrieve(job.id),
        lambda: b.fine_tuning.jobs.cancel(job.id),
        lambda: list(b.fine_tuning.jobs.list_events(job.id)),
        lambda: list(b.fine_tuning.jobs.checkpoints.list(job.id)),
        lambda: b.files.content(done.result_files[0]),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [f.id for f in b.files.list()] == [] and list(b.fine_tuning.jobs.list()) == []
    with pytest.raises(openai.BadRequestError) as refused:
        b.fine_tuning.jobs.create(model=server.engine.model_id, training_file=uploaded.id)
    assert refused.value.body["param"] == "training_file"  # type: ignore[index]


def test_a_file_with_line_errors_fails_with_the_line_named(server: Running) -> None:
    a = _client(server, "a")
    bad = _upload(a, sample_lines(20) + '{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    assert bad.status == "error" and "train.jsonl:21" in (bad.status_details or "")
    with pytest.raises(openai.BadRequestError) as refused:
        a.fine_tuning.jobs.create(model=server.engine.model_id, training_file=bad.id)
    assert "train.jsonl:21" in str(refused.value)


def test_bad_job_requests_name_the_field(server: Running) -> None:
    a = _client(server, "a")
    uploaded = _upload(a, sample_lines(20))
    cases = [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"extra_body": {"learning_rate": 1}}, "learning_rate"),
        ({"extra_body": {"loraforge": {"lora_rank": 4}}}, "loraforge.lora_rank"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            a.fine_tuning.jobs.create(model=server.engine.model_id, training_file=uploaded.id, **extra)
        assert refused.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as wrong_model:
        a.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=uploaded.id)
    assert wrong_model.value.body["param"] == "model"  # type: ignore[index]


def test_uploads_without_a_key_or_a_declaration(server: Running) -> None:
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.files.create(file=("t.jsonl", b"{}"), purpose="fine-tune")
    a = _client(server, "a")
    undeclared = a.files.create(file=("t.jsonl", sample_lines(20).encode()), purpose="fine-tune")
    assert undeclared.status == "error" and "no licence declared" in (undeclared.status_details or "")
    with pytest.raises(openai.BadRequestError) as partial:
        a.files.create(file=("t.jsonl", b"{}"), purpose="fine-tune", extra_body={"license": "MIT"})
    assert partial.value.body["param"] == "owner"  # type: ignore[index]


def test_the_files_and_jobs_commands_against_the_server(server: Running, tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading

    def run(*args: str, key: str = server.keys["a"]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "loraforge", *args, "--url", server.url, "--key", key],
            capture_output=True,
            text=True,
            timeout=600,
            env={**__import__("os").environ, "COLUMNS": "200"},
        )

    declare = ["--license", "CC0-1.0", "--owner", "Brightpath Bikes", "--no-personal-data"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(sample_lines(20) + '{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    refused = run("files", "upload", str(bad), *declare)
    assert refused.returncode == 1 and "bad.jsonl:21" in refused.stdout and "error" in refused.stdout
    undeclared = run("files", "upload", str(bad))
    assert undeclared.returncode == 1 and "license" in undeclared.stdout
    bad_id = refused.stdout.split()[0]
    assert bad_id.startswith("file-") and bad_id in run("files", "list").stdout
    assert run("files", "delete", bad_id).stdout.strip() == f"deleted {bad_id}"
    assert bad_id not in run("files", "list").stdout

    good = tmp_path / "train.jsonl"
    good.write_text(sample_lines(40))
    registry = open_registry(server.home)
    stop = threading.Event()
    settings = WorkerSettings(heartbeat_s=0.2, poll_s=0.1, checkpoint_every=2)
    worker = Worker(registry, server.home, LocalExecutor(server.home, threads=1), settings=settings)
    thread = threading.Thread(target=lambda: worker.run(stop=stop), daemon=True)
    thread.start()
    try:
        created = run(
            "jobs", "create", "--training-file", str(good), "--model", server.engine.model_id, "--suffix", "cli",
            "--max-steps", "2", "--lora-r", "4", "--metadata", "team=cli", *declare,
        )  # fmt: skip
    finally:
        stop.set()
        thread.join(timeout=60)
        registry.close()
    assert created.returncode == 0, created.stdout + created.stderr
    job_id = next(w for w in created.stdout.split() if w.startswith("ftjob-"))
    assert "succeeded" in created.stdout and f"ft:{server.engine.model_id}:tenant-a:cli:" in created.stdout
    assert "The job has successfully completed" in created.stdout
    assert job_id in run("jobs", "list", "--metadata", "team=cli").stdout
    assert job_id not in run("jobs", "list", "--metadata", "team=other").stdout
    shown = run("jobs", "show", job_id)
    assert "succeeded" in shown.stdout and "trained tokens" in shown.stdout
    events = run("jobs", "events", job_id).stdout.splitlines()
    assert "Validating training file" in events[0] or "created" in events[0].lower()
    assert events[-1].endswith("The job has successfully completed")

    queued = run(
        "jobs", "create", "--training-file", str(good), "--model", server.engine.model_id, "--no-follow", *declare
    )
    queued_id = next(w for w in queued.stdout.split() if w.startswith("ftjob-"))
    assert run("jobs", "cancel", queued_id).stdout.strip() == f"{queued_id}: cancelled"
    other = run("jobs", "show", job_id, key=server.keys["b"])
    assert other.returncode == 1 and "404" in other.stderr  # another tenant's job does not exist for it
    nobody = run("jobs", "list", key="lf-wrong")
    assert nobody.returncode == 1 and "401" in nobody.stderr
    down = subprocess.run(
        [sys.executable, "-m", "loraforge", "files", "list", "--url", "http://127.0.0.1:9", "--key", "x"],
        capture_output=True,
        text=True,
    )
    assert down.returncode == 1 and "cannot reach the server at http://127.0.0.1:9" in down.stderr


def test_a_tenants_default_declaration_covers_uploads_that_send_none(server: Running) -> None:
    b = _client(server, "b")
    covered = b.files.create(file=("b.jsonl", sample_lines(20).encode()), purpose="fine-tune")
    assert covered.status == "processed", covered.status_details
    a = _client(server, "a")  # tenant-a has no default: each upload must declare its licence
    undeclared = a.files.create(file=("a.jsonl", sample_lines(20).encode()), purpose="fine-tune")
    assert undeclared.status == "error" and "license" in (undeclared.status_details or "")


def test_default_declarations_are_checked_at_start() -> None:
    from loraforge.errors import ConfigError
    from loraforge.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=r"default_declarations.acme.personal_data must be true or false"):
        ServeConfig(default_declarations={"acme": {"license": "MIT", "owner": "Acme", "personal_data": "no"}})
    with pytest.raises(ConfigError, match=r"default_declarations.acme has unknown key\(s\) licence"):
        ServeConfig(
            default_declarations={"acme": {"licence": "MIT", "license": "MIT", "owner": "A", "personal_data": True}}
        )
