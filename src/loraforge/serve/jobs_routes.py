"""The files and fine-tuning jobs routes: OpenAI's paths over ``jobs.FileService`` and ``jobs.JobService``.

Thin, like the inference routes: authenticate, parse, call the service (in a worker thread: it
reads files and the registry), map its errors. ``RequestError`` → 400 naming the field;
``NotFoundError`` → 404, the same for another tenant's object as for a missing one.

    POST /v1/files   GET /v1/files   GET /v1/files/{id}   GET /v1/files/{id}/content   DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs   GET /v1/fine_tuning/jobs   GET /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel   GET /v1/fine_tuning/jobs/{id}/events
    GET  /v1/fine_tuning/jobs/{id}/checkpoints
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from loraforge.errors import NotFoundError, RequestError
from loraforge.govern.audit import AuditLog
from loraforge.govern.release import actor_name, creator
from loraforge.jobs.files import Declaration, FileService
from loraforge.jobs.service import JobService, metadata_filter, parse_job_request
from loraforge.serve.api_errors import APIError
from loraforge.serve.keys import KeyRecord

T = TypeVar("T")
CHUNK = 1 << 20
FILES = "/v1/files"
JOBS = "/v1/fine_tuning/jobs"


async def call(fn: Callable[[], T]) -> T:
    """Run a service call off the event loop; its domain errors become API errors."""
    try:
        return await asyncio.to_thread(fn)
    except RequestError as e:
        raise APIError(400, str(e), code=e.code, param=e.param) from e
    except NotFoundError as e:
        raise APIError(404, f"No such {e.kind}: '{e.ident}'.", code=f"{e.kind.replace(' ', '_')}_not_found") from e


def _int(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as e:
        raise APIError(400, f"{name} must be an integer, got {value!r}", param=name, code="invalid_request") from e


def add_jobs_routes(
    app: FastAPI,
    caller: Callable[[Request], KeyRecord],
    files: FileService,
    jobs: JobService,
    audit: AuditLog | None = None,
) -> None:
    """Add the files and jobs routes to ``app``; ``caller`` authenticates a request (401 otherwise).

    Uploads, file deletions, job creations and cancellations are written to ``audit``: their
    intent before they run, their outcome (the object's id, or the error) after.
    """

    def audited(
        key: KeyRecord, action: str, target: str, step: Callable[[], dict[str, Any]]
    ) -> Callable[[], dict[str, Any]]:
        if audit is None:
            return step

        def run() -> dict[str, Any]:
            with audit.action(actor_name(key), action, target, tenant=key.tenant) as act:
                result = step()
                act.outcome.update({k: result[k] for k in ("id", "status", "bytes") if k in result})
                return result

        return run

    @app.post(FILES)
    async def upload(request: Request, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        form = await request.form(max_files=1, max_fields=10)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
                raise APIError(
                    400, "file: a multipart file field named 'file' is required", param="file", code="invalid_request"
                )
            fields = {k: form.get(k) for k in ("purpose", "license", "owner", "personal_data")}
            texts = {k: v if isinstance(v, str) or v is None else None for k, v in fields.items()}
            try:
                declaration = Declaration.from_form(texts["license"], texts["owner"], texts["personal_data"])
            except RequestError as e:
                raise APIError(400, str(e), param=e.param, code=e.code) from e
            source: Any = upload

            def chunks() -> Iterator[bytes]:
                while block := source.file.read(CHUNK):
                    yield block

            name = str(source.filename or "")
            created = await call(
                audited(
                    key,
                    "file.upload",
                    name,
                    lambda: files.create(key.tenant, name, texts["purpose"] or "", chunks(), declaration),
                )
            )
        finally:
            await form.close()
        return JSONResponse(created)

    @app.get(FILES)
    async def list_files(request: Request, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        q = request.query_params
        found, more = await call(
            lambda: files.list(
                key.tenant,
                purpose=q.get("purpose"),
                after=q.get("after"),
                limit=_int(q.get("limit"), "limit", 10000),
                order=q.get("order", "desc"),
            )
        )
        return JSONResponse(
            {
                "object": "list",
                "data": found,
                "has_more": more,
                "first_id": found[0]["id"] if found else None,
                "last_id": found[-1]["id"] if found else None,
            }
        )

    @app.get(FILES + "/{file_id}")
    async def retrieve_file(file_id: str, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        return JSONResponse(await call(lambda: files.retrieve(key.tenant, file_id)))

    @app.get(FILES + "/{file_id}/content")
    async def file_content(file_id: str, key: KeyRecord = Depends(caller)) -> FileResponse:  # noqa: B008
        path = await call(lambda: files.content_path(key.tenant, file_id))
        return FileResponse(path, media_type="application/octet-stream")

    @app.delete(FILES + "/{file_id}")
    async def delete_file(file_id: str, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        return JSONResponse(await call(audited(key, "file.delete", file_id, lambda: files.delete(key.tenant, file_id))))

    @app.post(JOBS)
    async def create_job(request: Request, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, "The request body is not valid JSON.", code="invalid_request") from e
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        step = audited(
            key, "job.create", model, lambda: jobs.create(key.tenant, parse_job_request(body), creator(key, ""))
        )
        return JSONResponse(await call(step))

    @app.get(JOBS)
    async def list_jobs(request: Request, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        q = request.query_params
        metadata = await call(lambda: metadata_filter(dict(q)))
        return JSONResponse(
            await call(
                lambda: jobs.list(
                    key.tenant, after=q.get("after"), limit=_int(q.get("limit"), "limit", 20), metadata=metadata
                )
            )
        )

    @app.get(JOBS + "/{job_id}")
    async def retrieve_job(job_id: str, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        return JSONResponse(await call(lambda: jobs.retrieve(key.tenant, job_id)))

    @app.post(JOBS + "/{job_id}/cancel")
    async def cancel_job(job_id: str, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        return JSONResponse(await call(audited(key, "job.cancel", job_id, lambda: jobs.cancel(key.tenant, job_id))))

    @app.get(JOBS + "/{job_id}/events")
    async def job_events(job_id: str, request: Request, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        q = request.query_params
        return JSONResponse(
            await call(
                lambda: jobs.events(key.tenant, job_id, after=q.get("after"), limit=_int(q.get("limit"), "limit", 20))
            )
        )

    @app.get(JOBS + "/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, request: Request, key: KeyRecord = Depends(caller)) -> JSONResponse:  # noqa: B008
        q = request.query_params
        return JSONResponse(
            await call(
                lambda: jobs.checkpoints(
                    key.tenant, job_id, after=q.get("after"), limit=_int(q.get("limit"), "limit", 10)
                )
            )
        )
