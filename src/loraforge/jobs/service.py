"""Fine-tuning jobs as the API sees them: create, list, retrieve, cancel, events and checkpoints.

A job is a registry row that moves ``validating_files`` → ``queued`` → ``running`` → ``succeeded`` |
``failed`` | ``cancelled``. This service creates and reads jobs and records what clients ask for
(a cancel); a worker (:mod:`loraforge.jobs.worker`) runs them. Both meet only in the registry, so
the server and any number of workers can be stopped and restarted independently.

Every lookup is scoped to a tenant: another tenant's job is reported as missing, never as forbidden.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loraforge.errors import NotFoundError, RequestError
from loraforge.jobs.files import FileService
from loraforge.jobs.protocol import FINAL, JobCreate, page
from loraforge.registry.database import Registry
from loraforge.registry.schema import Checkpoint, Evaluation, Job, JobEvent, ensure_tenant


def parse_job_request(body: Any) -> JobCreate:
    """A job request, or a RequestError naming the first field that is wrong (and what it accepts)."""
    try:
        return JobCreate.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        param = _field(errors[0]["loc"])
        messages = [
            "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            for err in errors
            if _field(err["loc"]) == param
        ]
        raise RequestError(f"{param}: {' or '.join(dict.fromkeys(messages))}", param=param) from e


def _field(loc: tuple[Any, ...]) -> str:
    """``("hyperparameters", "batch_size", "literal['auto']")`` → ``hyperparameters.batch_size``."""
    names = [str(p) for p in loc if isinstance(p, str) and p.isidentifier() and p not in _TYPE_TAGS]
    return ".".join(names)


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


def fine_tuned_model_name(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<tenant>:<suffix>:<job id>``, as OpenAI names fine-tuned models (organisation → tenant)."""
    return f"ft:{base}:{tenant}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def add_event(
    session: Session, job_id: str, message: str, *, level: str = "info", kind: str = "message", data: Any = None
) -> None:
    """Append an event to a job; events are numbered within the job (the order clients page through).

    The server and a worker may add events to one job at once: a number taken by the other in the
    meantime is taken again (a savepoint keeps the rest of the transaction).
    """
    for attempt in range(20):
        seq = (session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0) + 1
        try:
            with session.begin_nested():
                session.add(
                    JobEvent(
                        id=f"ftevent-{secrets.token_hex(12)}",
                        job_id=job_id,
                        seq=seq,
                        created_at=time.time(),
                        level=level,
                        type=kind,
                        message=message,
                        data=data,
                    )
                )
            return
        except IntegrityError:
            time.sleep(0.01 * (attempt + 1))
    raise RuntimeError(f"could not number an event of job {job_id}: too many concurrent writers")


def job_object(row: Job, evaluation: Evaluation | None = None) -> dict[str, Any]:
    """OpenAI's ``fine_tuning.job`` object, with loraforge's settings and the gate's verdict under ``loraforge``."""
    hyper = (row.method.get("supervised") or {}).get("hyperparameters") or {}
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": int(row.created_at),
        "error": row.error,
        "fine_tuned_model": row.fine_tuned_model if row.status == "succeeded" else None,
        "finished_at": int(row.finished_at) if row.finished_at else None,
        "hyperparameters": hyper,
        "method": row.method,
        "model": row.model,
        "organization_id": row.tenant,
        "result_files": row.result_files,
        "seed": row.seed,
        "status": row.status,
        "trained_tokens": row.trained_tokens,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "estimated_finish": int(row.estimated_finish) if row.estimated_finish and row.status == "running" else None,
        "integrations": [],
        "metadata": row.user_metadata,
        "user_provided_suffix": row.suffix,
        "loraforge": {
            **row.extensions,
            "attempts": row.attempts,
            "cancel_requested": row.cancel_requested,
            "evaluation": {"verdict": evaluation.verdict, "policy": evaluation.policy, "headline": evaluation.headline}
            if evaluation
            else None,
        },
    }


def event_object(row: JobEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": int(row.created_at),
        "level": row.level,
        "message": row.message,
        "data": row.data or {},
        "type": row.type,
    }


def checkpoint_object(row: Checkpoint) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(row.created_at),
        "fine_tuned_model_checkpoint": row.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": row.job_id,
        "metrics": row.metrics,
        "step_number": row.step,
    }


class JobService:
    """What the API does with jobs; the worker runs them."""

    def __init__(
        self,
        registry: Registry,
        files: FileService,
        *,
        base_models: dict[str, str],
        base_sources: dict[str, str] | None = None,
    ) -> None:
        """
        Args:
            base_models: the base models jobs may start from, by the name clients use → its sha256.
            base_sources: where training finds each (a packaged name or a directory), when not its name.
        """
        self.registry = registry
        self.files = files
        self.base_models = base_models
        self.base_sources = base_sources or {}

    def create(self, tenant: str, request: JobCreate, created_by: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check the request's model and files, then queue the job.

        Args:
            created_by: who asks (``govern.release.creator``): the key and person its model is
                credited to, whom separation of duties keeps from approving it.

        Raises:
            RequestError: an unknown base model, or a file that is missing, another tenant's, or failed its check.
        """
        if request.model not in self.base_models:
            known = ", ".join(sorted(self.base_models)) or "none"
            raise RequestError(
                f"model {request.model!r} cannot be fine-tuned here; base models: {known}",
                param="model",
                code="model_not_available",
            )
        for param, ident in (("training_file", request.training_file), ("validation_file", request.validation_file)):
            if ident is None:
                continue
            try:
                stored = self.files.get(tenant, ident)
            except NotFoundError as e:
                raise RequestError(f"{param}: no file {ident!r}", param=param, code="invalid_file") from e
            if stored.status != "processed":
                raise RequestError(
                    f"{param}: file {ident} cannot be trained on: {stored.status_details or stored.status}",
                    param=param,
                    code="invalid_file",
                )
        hyper = request.resolved_hyperparameters()
        method = {"type": "supervised", "supervised": {"hyperparameters": hyper.model_dump()}}
        now = time.time()
        ident = f"ftjob-{secrets.token_hex(12)}"
        with self.registry.session() as s:
            ensure_tenant(s, tenant, now)
            row = Job(
                id=ident,
                tenant=tenant,
                model=request.model,
                base_sha256=self.base_models[request.model],
                training_file=request.training_file,
                validation_file=request.validation_file,
                status="validating_files",
                method=method,
                extensions=request.loraforge.model_dump(),
                config={"base_model": self.base_sources.get(request.model, request.model)},
                suffix=request.suffix,
                seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
                user_metadata=request.metadata,
                result_files=[],
                attempts=0,
                cancel_requested=False,
                created_at=now,
                created_by=created_by,
            )
            s.add(row)
            s.flush()
            add_event(s, ident, f"Validating training file: {request.training_file}")
            # uploads are checked when they arrive, so a job's files are known good here
            row.status = "queued"
            add_event(s, ident, "Files validated, moving job to queued state")
            return job_object(row)

    def _get(self, s: Session, tenant: str, ident: str) -> Job:
        row = s.get(Job, ident)
        if row is None or row.tenant != tenant:
            raise NotFoundError("fine-tuning job", ident)
        return row

    def retrieve(self, tenant: str, ident: str) -> dict[str, Any]:
        with self.registry.session() as s:
            return self._object(s, self._get(s, tenant, ident))

    def _object(self, s: Session, row: Job) -> dict[str, Any]:
        evaluation = None
        if row.status == "succeeded" and row.fine_tuned_model:
            evaluation = s.scalars(
                select(Evaluation)
                .where(Evaluation.adapter == row.fine_tuned_model)
                .order_by(Evaluation.created_at.desc())
            ).first()
        return job_object(row, evaluation)

    def list(
        self, tenant: str, *, after: str | None = None, limit: int = 20, metadata: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A page of the tenant's jobs, newest first, optionally only those whose metadata has all of ``metadata``."""
        _check_limit(limit)
        with self.registry.session() as s:
            q = select(Job).where(Job.tenant == tenant)
            if after:
                anchor = self._get(s, tenant, after)
                q = q.where(
                    (Job.created_at < anchor.created_at)
                    | ((Job.created_at == anchor.created_at) & (Job.id < anchor.id))
                )
            q = q.order_by(Job.created_at.desc(), Job.id.desc())
            out: list[dict[str, Any]] = []
            more = False
            for row in s.scalars(q):  # metadata is JSON: filtered here, the same on SQLite and PostgreSQL
                if metadata and any((row.user_metadata or {}).get(k) != v for k, v in metadata.items()):
                    continue
                if len(out) == limit:
                    more = True
                    break
                out.append(self._object(s, row))
        return page(out, more)

    def cancel(self, tenant: str, ident: str) -> dict[str, Any]:
        """Cancel a job: a queued one at once; a running one is stopped by its worker within seconds.

        Raises:
            RequestError: the job has already finished.
        """
        with self.registry.session() as s:
            row = self._get(s, tenant, ident)
            if row.status in FINAL:
                raise RequestError(
                    f"job {ident} has already finished ({row.status}); there is nothing to cancel",
                    param="fine_tuning_job_id",
                    code="invalid_state",
                )
            if row.status == "running":
                row.cancel_requested = True
                add_event(s, ident, "Cancellation requested; the worker stops the job and keeps its last checkpoint")
            else:
                row.status, row.finished_at = "cancelled", time.time()
                add_event(s, ident, "Job cancelled before it started")
            return job_object(row)

    def events(self, tenant: str, ident: str, *, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """A page of the job's events, newest first (OpenAI's order)."""
        return self._page(tenant, ident, JobEvent, JobEvent.seq, event_object, "event", after, limit)

    def checkpoints(self, tenant: str, ident: str, *, after: str | None = None, limit: int = 10) -> dict[str, Any]:
        """A page of the job's checkpoints, latest step first."""
        return self._page(tenant, ident, Checkpoint, Checkpoint.step, checkpoint_object, "checkpoint", after, limit)

    def _page(
        self,
        tenant: str,
        ident: str,
        model: type[JobEvent] | type[Checkpoint],
        order: Any,
        to_object: Callable[[Any], dict[str, Any]],
        kind: str,
        after: str | None,
        limit: int,
    ) -> dict[str, Any]:
        """A page of a job's rows of ``model``, highest ``order`` first, after the row ``after``."""
        _check_limit(limit)
        with self.registry.session() as s:
            self._get(s, tenant, ident)
            q = select(model).where(model.job_id == ident)
            if after:
                anchor: Any = s.get(model, after)
                if anchor is None or anchor.job_id != ident:
                    raise NotFoundError(kind, after)
                q = q.where(order < getattr(anchor, order.key))
            rows = list(s.scalars(q.order_by(order.desc()).limit(limit + 1)))
        return page([to_object(r) for r in rows[:limit]], len(rows) > limit)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= 100:
        raise RequestError(f"limit must be from 1 to 100, got {limit}", param="limit")


def metadata_filter(query: dict[str, str]) -> dict[str, str] | None:
    """``metadata[key]=value`` query parameters (OpenAI's filter syntax) as a dict."""
    found = {k[len("metadata[") : -1]: v for k, v in query.items() if k.startswith("metadata[") and k.endswith("]")}
    if "metadata" in query:
        try:
            loaded = json.loads(query["metadata"])
        except ValueError as e:
            raise RequestError("metadata must be a JSON object of strings", param="metadata") from e
        if not isinstance(loaded, dict):
            raise RequestError("metadata must be a JSON object of strings", param="metadata")
        found.update({str(k): str(v) for k, v in loaded.items()})
    return found or None
