"""The registry's tables: the one source of truth for tenants, keys, files, jobs, adapters and usage.

::

    tenants ─┬─< api_keys                      (sha256 hashes only)
             ├─< files ──────────────┐         (uploaded training data: hash, licence, check result)
             ├─< jobs >──────────────┘         (training_file, validation_file)
             │     ├─< job_events              (ordered by seq within a job)
             │     └─< checkpoints             (step, OpenAI's metric names)
             ├─< adapters >── jobs             (registrations; lineage: base hash → files → job → evaluations)
             │     ├─< evaluations
             │     └─< adapter_transitions     (draft → evaluated → approved → deployed → retired: who, when, why)
             ├─< routes ─┬< deployments        (a model name clients use → the adapter deployed under it)
             │           └< pilots             (a share of its end users sent to a challenger adapter)
             ├─< release_policies              (approvals required; "*" for every tenant)
             └─< usage_records ─ feedback      (each request: tokens, cost, adapter, arm, latency, drift; ratings)
    audit_heads                                (the audit log's last count and hash: a deleted tail is caught)

Times are UNIX seconds (floats), as everywhere else in loraforge. JSON columns hold what has no
fixed shape (hyperparameters, metrics, evidence). Every change to these classes comes with an
Alembic migration in ``migrations/versions``: a test compares the two and fails on any difference.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names fixed by convention, so that migrations name them the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME = 64  # tenant, adapter and route names (``valid_name``)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched in full (``fullmatch``)
ID = 64  # object ids: "file-…", "ftjob-…", key ids


def valid_name(name: str) -> bool:
    """Whether ``name`` is a usable tenant, adapter or route name, all of it (no trailing newline)."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    """An API key: only its sha256 is stored; the key itself is shown once, when created."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    all_tenants: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the person the key belongs to: separation of duties compares people, not only keys
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # production keys reach deployed routes only; development keys their tenant's adapters too
    environment: Mapped[str] = mapped_column(String(16), server_default="development")


class File(Base):
    """An uploaded file (``purpose=fine-tune``): where its bytes are, their hash, and its check."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    # uploaded → processed | error (OpenAI's file statuses), with the reason in status_details
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    licence: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the declared licence manifest
    check: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the data check's summary
    created_at: Mapped[float] = mapped_column(Float)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Job(Base):
    """A fine-tuning job, from ``validating_files`` to ``succeeded`` | ``failed`` | ``cancelled``."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created_at", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    model: Mapped[str] = mapped_column(String(255))  # the base model
    base_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    training_file: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file: Mapped[str | None] = mapped_column(ForeignKey("files.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(24))
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type": "supervised", "supervised": {hyperparameters}}
    extensions: Mapped[dict[str, Any]] = mapped_column(JSON)  # loraforge's own settings (LoRA rank, suites…)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the resolved training config
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {code, message, param}
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    estimated_finish: Mapped[float | None] = mapped_column(Float, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    output_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the worker holding the job and its last sign of life: a running job whose heartbeat is older
    # than the timeout is resumed from its checkpoint or failed, never left running forever
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {actor, key, owner}
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, … within the job: the order of pagination
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    # OpenAI's names: step, train_loss, train_mean_token_accuracy, valid_loss, …
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(Text)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Float)


class Adapter(Base):
    """A registered adapter: who may use it, the hashes that pin it, and where it came from."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(ForeignKey("tenants.name"), nullable=True, index=True)  # None: public
    base_model: Mapped[str] = mapped_column(String(255))
    base_sha256: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    config_sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)  # the directory it was registered from
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    # lineage from the manifest: datasets (paths, hashes, licences), governance findings, config
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    governance_flags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    governance_override: Mapped[str | None] = mapped_column(Text, nullable=True)
    added_at: Mapped[float] = mapped_column(Float)
    # the release lifecycle (``govern.release``): draft → evaluated → approved → deployed → retired
    state: Mapped[str] = mapped_column(String(16), server_default="draft")
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {actor, key, owner}
    # why it was approved although its evaluation did not pass the release gate
    release_override: Mapped[str | None] = mapped_column(Text, nullable=True)


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    adapter: Mapped[str] = mapped_column(ForeignKey("adapters.name", ondelete="CASCADE"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))  # PASS | FAIL | INCONCLUSIVE
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    headline: Mapped[dict[str, Any]] = mapped_column(JSON)
    report_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class AdapterTransition(Base):
    """One step of an adapter's release: registration, evaluation, approval, rejection, deployment…

    Kept when the adapter is removed (no foreign key): the history of a name is evidence.
    """

    __tablename__ = "adapter_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter: Mapped[str] = mapped_column(String(255), index=True)
    action: Mapped[str] = mapped_column(String(16))  # register | evaluate | approve | reject | deploy | …
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(255))  # "key:ID" or "cli:USER"
    key_id: Mapped[str | None] = mapped_column(String(ID), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    override: Mapped[bool] = mapped_column(Boolean, default=False)  # approved despite a failed gate
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class ReleasePolicy(Base):
    """How many distinct approvers a tenant's adapters need (``scope`` "*": the default for all)."""

    __tablename__ = "release_policies"

    scope: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    approvals_required: Mapped[int] = mapped_column(Integer)
    updated_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[float] = mapped_column(Float)


class Route(Base):
    """A model name clients use (``support-bot``), bound to the adapter deployed under it."""

    __tablename__ = "routes"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(ForeignKey("tenants.name"), nullable=True, index=True)  # None: public
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Float)


class Deployment(Base):
    """A route's binding to an adapter, from ``created_at`` until ``ended_at`` (None: serving now).

    ``previous_id`` is the deployment this one replaced: a rollback restores it (and takes its own
    previous one as its previous, so that rolling back again goes one further back).
    """

    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_route_ended_at", "route", "ended_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(ForeignKey("routes.name"))
    adapter: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(16))  # deploy | rollback
    previous_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditHead(Base):
    """The audit log's count and last hash, written after every append: a witness outside the home's
    files, so that deleting the log's last records (and rewriting ``audit.head``) is caught."""

    __tablename__ = "audit_heads"

    log: Mapped[str] = mapped_column(String(255), primary_key=True)  # the log's identity (its key id)
    count: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Float)


class Pilot(Base):
    """A split of a route's traffic: ``percent`` of its end users get ``adapter`` (the challenger),
    the others the route's deployed adapter (the control), from ``started_at`` until ``ended_at``."""

    __tablename__ = "pilots"
    __table_args__ = (Index("ix_pilots_route_ended_at", "route", "ended_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(ForeignKey("routes.name"))
    control: Mapped[str] = mapped_column(String(255))  # the route's adapter when the pilot started
    adapter: Mapped[str] = mapped_column(String(255))  # the challenger
    percent: Mapped[int] = mapped_column(Integer)  # of end users sent to the challenger
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)  # stopped | promoted
    ended_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class Feedback(Base):
    """An end user's rating of one response (``request_id``): thumbs (1/0) or 1-5, scored 0..1."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(ID), unique=True)
    tenant: Mapped[str] = mapped_column(String(NAME), index=True)
    key_id: Mapped[str] = mapped_column(String(ID))
    rating: Mapped[int] = mapped_column(Integer)  # thumbs: 1 up, 0 down; stars: 1-5
    scale: Mapped[str] = mapped_column(String(8))  # thumbs | stars
    score: Mapped[float] = mapped_column(Float)  # the rating on 0..1 (thumbs as is, stars (r-1)/4)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class UsageRecord(Base):
    """One finished request: its tokens and cost, and for monitoring what served it and how it went.

    ``route`` is the name a client called when it was a route; ``adapter`` the adapter that answered
    (None: the base model); ``arm`` and ``pilot_id`` the pilot arm that took it; ``user_hash`` a
    hash of the end user's id (the id itself is never stored).
    """

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_tenant_ts", "tenant", "ts"),
        Index("ix_usage_records_model_ts", "model", "ts"),
        Index("ix_usage_records_pilot_id", "pilot_id"),
        Index("ix_usage_records_request_id", "request_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float)
    request_id: Mapped[str] = mapped_column(String(ID))
    tenant: Mapped[str] = mapped_column(String(NAME))
    key_id: Mapped[str] = mapped_column(String(ID))
    model: Mapped[str] = mapped_column(String(255))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost: Mapped[float] = mapped_column(Float)
    adapter: Mapped[str | None] = mapped_column(String(255), nullable=True)
    route: Mapped[str | None] = mapped_column(String(255), nullable=True)
    pilot_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    arm: Mapped[str | None] = mapped_column(String(16), nullable=True)  # control | challenger
    user_hash: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[int] = mapped_column(Integer, server_default="200")
    latency_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    refusal: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # the answer refused (None: no answer)
    novelty: Mapped[float | None] = mapped_column(Float, nullable=True)  # input drift (``data.drift``)
    unfamiliar: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class GuardReview(Base):
    """A request a guard check blocked or flagged, waiting for (or after) a person's review.

    ``excerpt`` is the message that fired, with personal data and secrets replaced by placeholders
    and cut to ``EXCERPT`` characters. Rows are never deleted: a review is resolved with a decision
    (``attack``, ``false_positive`` or ``unclear``), who resolved it and why.
    """

    __tablename__ = "guard_reviews"
    __table_args__ = (Index("ix_guard_reviews_tenant_status", "tenant", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(ID), index=True)
    tenant: Mapped[str] = mapped_column(String(NAME))
    key_id: Mapped[str] = mapped_column(String(ID))
    model: Mapped[str] = mapped_column(String(255))
    check: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))  # block | flag
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    role: Mapped[str] = mapped_column(String(16))
    message: Mapped[int] = mapped_column(Integer)  # the message's index in the request
    excerpt: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # open | resolved
    decision: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Migration(Base):
    """A file of a file-based home imported into the registry: which, its hash, where it was kept.

    One row per file (``keys.json``, ``usage.jsonl``, ``adapters/NAME/registration.json``), written
    in the transaction that imports it: a file found again with the same hash was imported already
    (the process stopped before moving it to the backup) and is only moved.
    """

    __tablename__ = "home_migrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(255))  # the file's path in the home
    sha256: Mapped[str] = mapped_column(String(64), server_default="")  # "" in rows of revision 0001
    backup: Mapped[str] = mapped_column(Text)
    records: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


def ensure_tenant(session: Any, name: str, now: float) -> None:
    """Create the tenant ``name`` if the registry has no row for it yet (tenants exist once named)."""
    if session.get(Tenant, name) is None:
        session.add(Tenant(name=name, created_at=now))
        session.flush()
