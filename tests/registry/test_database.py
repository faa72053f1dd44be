"""The registry database: migrations match the models, on SQLite always and on PostgreSQL when one answers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from loraforge.errors import ConfigError
from loraforge.registry import schema
from loraforge.registry.database import (
    URL_ENV,
    alembic_config,
    current_revision,
    database_url,
    downgrade,
    head_revision,
    make_engine,
    open_registry,
    upgrade,
)

TABLES = {
    "tenants",
    "api_keys",
    "files",
    "jobs",
    "job_events",
    "checkpoints",
    "adapters",
    "evaluations",
    "usage_records",
    "home_migrations",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


def test_default_is_sqlite_in_the_home_and_the_env_selects_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    assert database_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'registry.db'}"
    monkeypatch.setenv(URL_ENV, "postgresql://ana@db.internal/registry")
    assert database_url(tmp_path) == "postgresql+psycopg://ana@db.internal/registry"
    assert database_url(tmp_path, "sqlite:////x/r.db") == "sqlite:////x/r.db"  # an explicit URL wins
    with pytest.raises(ConfigError, match="only sqlite and postgresql"):
        database_url(tmp_path, "mysql://root@localhost/x")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        database_url(tmp_path, "not a url")


def test_opening_creates_every_table_at_the_newest_revision(url: str, tmp_path: Path) -> None:
    registry = open_registry(tmp_path, url)
    try:
        assert set(inspect(registry.engine).get_table_names()) >= TABLES
        assert current_revision(registry.engine) == head_revision(registry.engine)
        if registry.engine.dialect.name == "sqlite":
            with registry.engine.connect() as c:
                assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
                assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
        registry.close()
        again = open_registry(tmp_path, url, upgrade_schema=False)  # current: opens without upgrading
        again.close()
    finally:
        registry.close()


def test_the_migrations_describe_exactly_the_models(url: str) -> None:
    """A model changed without a migration (or the reverse) fails here, on each database."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        upgrade(engine)
        with engine.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), schema.Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_down_to_empty_and_up_again(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
        downgrade(engine, "base")
        assert not (set(inspect(engine).get_table_names()) & TABLES)
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_a_schema_behind_is_refused_when_told_not_to_upgrade(url: str, tmp_path: Path) -> None:
    engine = make_engine(url)
    engine.dispose()
    with pytest.raises(ConfigError, match=r"is empty, behind this loraforge .*loraforge registry upgrade"):
        open_registry(tmp_path, url, upgrade_schema=False)
    assert not (set(inspect(make_engine(url)).get_table_names()) & TABLES)  # nothing was created


def test_a_schema_from_a_newer_version_is_refused(url: str, tmp_path: Path) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
        with engine.begin() as c:
            c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(ConfigError, match="9999, which this loraforge does not know"):
        open_registry(tmp_path, url)


def test_rows_keep_their_links_and_constraints(url: str, tmp_path: Path) -> None:
    registry = open_registry(tmp_path, url)
    now = time.time()
    try:
        with registry.session() as s:
            s.add(schema.Tenant(name="acme", created_at=now))
            s.flush()
            s.add(schema.ApiKey(id="key-1", hash="a" * 64, tenant="acme", role="user", created_at=now))
            s.add(
                schema.File(
                    id="file-1",
                    tenant="acme",
                    filename="train.jsonl",
                    purpose="fine-tune",
                    bytes=10,
                    sha256="b" * 64,
                    path="/x",
                    status="processed",
                    licence={"license": "CC-BY-4.0"},
                    created_at=now,
                )
            )
            s.flush()
            s.add(
                schema.Job(
                    id="ftjob-1",
                    tenant="acme",
                    model="smollm2-135m-instruct",
                    training_file="file-1",
                    status="queued",
                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}},
                    extensions={},
                    user_metadata={"team": "support"},
                    created_at=now,
                )
            )
            s.flush()
            s.add_all(
                schema.JobEvent(
                    id=f"ftevent-{i}", job_id="ftjob-1", seq=i, created_at=now, level="info", type="message", message=m
                )
                for i, m in enumerate(["validating", "queued"], start=1)
            )
        with registry.session() as s:
            job = s.get(schema.Job, "ftjob-1")
            assert job is not None and job.user_metadata == {"team": "support"} and job.result_files == []
            assert job.attempts == 0 and job.cancel_requested is False
            events = s.scalars(select(schema.JobEvent.message).order_by(schema.JobEvent.seq)).all()
            assert events == ["validating", "queued"]
        # a key of a tenant that does not exist, a duplicate key hash, a duplicate event number: refused
        for bad in (
            schema.ApiKey(id="key-2", hash="c" * 64, tenant="nobody", role="user", created_at=now),
            schema.ApiKey(id="key-3", hash="a" * 64, tenant="acme", role="user", created_at=now),
            schema.JobEvent(
                id="ftevent-9", job_id="ftjob-1", seq=1, created_at=now, level="info", type="message", message="again"
            ),
        ):
            with pytest.raises(IntegrityError), registry.session() as s:
                s.add(bad)
    finally:
        registry.close()


def test_alembic_config_needs_no_ini_file(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    config = alembic_config(engine)
    assert Path(config.get_main_option("script_location") or "").joinpath("versions").is_dir()
    engine.dispose()


def test_an_upgrade_from_the_previous_revision_keeps_every_row(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as c:
            c.execute(text("INSERT INTO tenants (name, created_at) VALUES ('acme', 1.0)"))
            c.execute(
                text(
                    "INSERT INTO api_keys (id, hash, tenant, role, all_tenants, created_at) "
                    "VALUES ('k1', :h, 'acme', 'user', false, 1.0)"
                ),
                {"h": "a" * 64},
            )
            c.execute(
                text(
                    "INSERT INTO home_migrations (source, backup, records, created_at) "
                    "VALUES ('keys.json', 'b', 1, 2.0)"
                )
            )
        upgrade(engine)
        assert current_revision(engine) == head_revision(engine) != "0001"
        with engine.connect() as c:
            assert c.execute(text("SELECT source, sha256, records FROM home_migrations")).one() == ("keys.json", "", 1)
            assert c.execute(text("SELECT tenant FROM api_keys WHERE id = 'k1'")).scalar() == "acme"
        downgrade(engine, "0001")  # and back: the older code's schema, rows still there
        with engine.connect() as c:
            assert c.execute(text("SELECT source, records FROM home_migrations")).one() == ("keys.json", 1)
    finally:
        engine.dispose()
