"""Files and jobs as the API sees them: checks on upload, OpenAI's shapes, pagination, tenant isolation."""

from __future__ import annotations

import pytest

from loraforge.errors import NotFoundError, RequestError
from loraforge.jobs.files import Declaration, FileService
from loraforge.jobs.service import JobService, metadata_filter, parse_job_request
from tests.jobs.conftest import BASE, DECLARED, sample_lines, upload


def test_a_declared_clean_upload_is_processed(files: FileService) -> None:
    obj = upload(files, "acme", sample_lines(30), declaration=DECLARED)
    assert obj["object"] == "file" and obj["id"].startswith("file-") and obj["purpose"] == "fine-tune"
    assert obj["status"] == "processed", obj["status_details"]
    assert obj["filename"] == "train.jsonl" and obj["bytes"] == len(sample_lines(30).encode())
    stored = files.get("acme", obj["id"])
    assert stored.licence == {
        "sources": [{"path": "data.jsonl", "license": "CC0-1.0", "owner": "Brightpath Bikes", "personal_data": False}]
    }
    assert files.content_path("acme", obj["id"]).read_text() == sample_lines(30)
    assert (files.content_path("acme", obj["id"]).stat().st_mode & 0o077) == 0  # private


def test_line_errors_fail_the_file_with_the_line_named(files: FileService) -> None:
    text = sample_lines(20) + '{"messages": [{"role": "wizard", "content": "hi"}]}\n' + "not json\n"
    obj = upload(files, "acme", text, declaration=DECLARED)
    assert obj["status"] == "error"
    assert "train.jsonl:21" in obj["status_details"] and "train.jsonl:22" in obj["status_details"]
    assert "data.jsonl" not in obj["status_details"] and "/" not in obj["status_details"].split(":")[0]


def test_an_undeclared_licence_fails_with_how_to_declare_it(files: FileService, registry: object) -> None:
    obj = upload(files, "acme", sample_lines(20))
    assert obj["status"] == "error"
    assert "no licence declared" in obj["status_details"] and "extra_body" in obj["status_details"]
    # a tenant's default declaration stands in for a missing one
    tenant_default = FileService(files.registry, files.root, max_bytes=1 << 20, default_declarations={"acme": DECLARED})
    assert upload(tenant_default, "acme", sample_lines(20))["status"] == "processed"
    assert upload(tenant_default, "other", sample_lines(20))["status"] == "error"


def test_a_denied_licence_fails_by_the_policy(files: FileService) -> None:
    obj = upload(files, "acme", sample_lines(20), declaration=Declaration("CC-BY-NC-4.0", "someone", False))
    assert obj["status"] == "error" and "CC-BY-NC-4.0" in obj["status_details"]


@pytest.mark.parametrize(
    ("name", "purpose", "data", "param"),
    [
        ("train.jsonl", "assistants", b"{}", "purpose"),
        ("train.exe", "fine-tune", b"{}", "file"),
        ("train.jsonl", "fine-tune", b"", "file"),
        ("train.jsonl", "fine-tune", b"x" * (1 << 20 + 1), "file"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(
    files: FileService, name: str, purpose: str, data: bytes, param: str
) -> None:
    with pytest.raises(RequestError) as e:
        files.create("acme", name, purpose, [data])
    assert e.value.param == param
    assert not files.root.exists() or not any(files.root.iterdir())
    assert files.list("acme")[0] == []


def test_partial_declarations_name_what_is_missing() -> None:
    assert Declaration.from_form(None, None, None) is None
    with pytest.raises(RequestError, match="owner, personal_data missing"):
        Declaration.from_form("MIT", None, None)
    with pytest.raises(RequestError, match="true or false"):
        Declaration.from_form("MIT", "me", "maybe")
    assert Declaration.from_form("MIT", "me", "False") == Declaration("MIT", "me", False)


def test_files_of_another_tenant_do_not_exist(files: FileService) -> None:
    mine = upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"]
    for call in (files.retrieve, files.content_path, files.delete):
        with pytest.raises(NotFoundError):
            call("globex", mine)  # type: ignore[operator]
    assert files.list("globex")[0] == []
    assert [f["id"] for f in files.list("acme")[0]] == [mine]


def test_file_listing_pages_newest_first(files: FileService) -> None:
    ids = [upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"] for _ in range(5)]
    first, more = files.list("acme", limit=2)
    assert [f["id"] for f in first] == ids[::-1][:2] and more
    rest, more = files.list("acme", limit=10, after=first[-1]["id"])
    assert [f["id"] for f in rest] == ids[::-1][2:] and not more
    asc, _ = files.list("acme", order="asc")
    assert [f["id"] for f in asc] == ids


def test_deleting_a_file_removes_its_bytes_unless_a_job_needs_it(files: FileService, jobs: JobService) -> None:
    a = upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"]
    b = upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"]
    job = jobs.create("acme", parse_job_request({"model": BASE, "training_file": b}))
    path = files.content_path("acme", a)
    assert files.delete("acme", a) == {"id": a, "object": "file", "deleted": True}
    assert not path.exists()
    with pytest.raises(NotFoundError):
        files.retrieve("acme", a)
    with pytest.raises(RequestError, match=job["id"]):
        files.delete("acme", b)
    jobs.cancel("acme", job["id"])
    files.delete("acme", b)


def test_a_job_is_queued_in_openai_shape(files: FileService, jobs: JobService) -> None:
    training = upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"]
    job = jobs.create(
        "acme",
        parse_job_request(
            {
                "model": BASE,
                "training_file": training,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
                "suffix": "support",
                "metadata": {"team": "care"},
                "loraforge": {"lora_r": 8},
            }
        ),
    )
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["id"].startswith("ftjob-")
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert job["fine_tuned_model"] is None and job["result_files"] == [] and isinstance(job["seed"], int)
    assert job["organization_id"] == "acme" and job["metadata"] == {"team": "care"}
    assert job["loraforge"]["lora_r"] == 8
    events = jobs.events("acme", job["id"])
    assert [e["message"] for e in events["data"]] == [
        "Files validated, moving job to queued state",
        f"Validating training file: {training}",
    ]
    assert events["object"] == "list" and events["has_more"] is False


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"training_file": "f"}, "model"),
        ({"model": BASE, "training_file": "f", "learning_rate": 3}, "learning_rate"),
        ({"model": BASE, "training_file": "f", "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"model": BASE, "training_file": "f", "hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
        ({"model": BASE, "training_file": "f", "method": {"type": "dpo"}}, "method.type"),
        ({"model": BASE, "training_file": "f", "suffix": "no spaces please"}, "suffix"),
        ({"model": BASE, "training_file": "f", "loraforge": {"lora_rank": 8}}, "loraforge.lora_rank"),
        ({"model": BASE, "training_file": "f", "integrations": [{"type": "wandb"}]}, "integrations"),
    ],
)
def test_bad_job_requests_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_job_request(body)
    assert e.value.param == param


def test_jobs_refuse_unknown_models_and_bad_or_foreign_files(files: FileService, jobs: JobService) -> None:
    good = upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"]
    bad = upload(files, "acme", "not json\n" + sample_lines(20), declaration=DECLARED)["id"]
    foreign = upload(files, "globex", sample_lines(20), declaration=DECLARED)["id"]
    cases = [
        ({"model": "gpt-4o-mini", "training_file": good}, "model", "cannot be fine-tuned here"),
        ({"model": BASE, "training_file": bad}, "training_file", "train.jsonl:1"),
        ({"model": BASE, "training_file": foreign}, "training_file", "no file"),
        ({"model": BASE, "training_file": good, "validation_file": "file-nope"}, "validation_file", "no file"),
    ]
    for body, param, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            jobs.create("acme", parse_job_request(body))
        assert e.value.param == param


def test_jobs_list_page_and_filter_by_metadata_within_the_tenant(files: FileService, jobs: JobService) -> None:
    training = upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"]
    made = [
        jobs.create("acme", parse_job_request({"model": BASE, "training_file": training, "metadata": {"n": str(i)}}))
        for i in range(5)
    ]
    page1 = jobs.list("acme", limit=3)
    assert [j["id"] for j in page1["data"]] == [j["id"] for j in made[::-1][:3]] and page1["has_more"]
    page2 = jobs.list("acme", limit=3, after=page1["last_id"])
    assert [j["id"] for j in page2["data"]] == [j["id"] for j in made[::-1][3:]] and not page2["has_more"]
    assert [j["id"] for j in jobs.list("acme", metadata={"n": "2"})["data"]] == [made[2]["id"]]
    assert jobs.list("globex")["data"] == []
    for call in (jobs.retrieve, jobs.cancel, jobs.events, jobs.checkpoints):
        with pytest.raises(NotFoundError):
            call("globex", made[0]["id"])  # type: ignore[operator]
    assert metadata_filter({"metadata[n]": "2", "limit": "3"}) == {"n": "2"}


def test_cancel_a_queued_job_at_once_and_a_finished_one_never(files: FileService, jobs: JobService) -> None:
    training = upload(files, "acme", sample_lines(20), declaration=DECLARED)["id"]
    job = jobs.create("acme", parse_job_request({"model": BASE, "training_file": training}))
    cancelled = jobs.cancel("acme", job["id"])
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    with pytest.raises(RequestError, match="already finished"):
        jobs.cancel("acme", job["id"])
