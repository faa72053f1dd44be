"""Opening the registry: SQLite in the home by default, PostgreSQL by URL; the schema kept current.

``open_registry(home)`` uses ``HOME/registry.db`` (SQLite in WAL mode: readers never wait for the
writer, and nothing needs to be started on one machine). A URL, from the argument or
``LORAFORGE_DATABASE_URL``, selects another database: ``postgresql://user@host/db`` (the
``psycopg`` driver is used whatever the URL says) or another SQLite file.

The schema is versioned with Alembic; the migrations ship inside the package. Opening upgrades the
schema to the newest revision, unless the caller says not to (``upgrade=False``): then a database
behind the code is refused with the command that upgrades it, rather than used half-understood.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from loraforge.errors import ConfigError
from loraforge.files import private_directory

URL_ENV = "LORAFORGE_DATABASE_URL"
FILENAME = "registry.db"
MIGRATIONS = Path(__file__).with_name("migrations")
READ_ONLY = "loraforge_read_only"  # an execution option: the transaction only reads


def database_url(home: Path, url: str | None = None) -> str:
    """The registry's URL: ``url``, else ``$LORAFORGE_DATABASE_URL``, else SQLite at ``HOME/registry.db``."""
    chosen = url or os.environ.get(URL_ENV)
    if not chosen:
        return f"sqlite:///{Path(home).resolve() / FILENAME}"
    try:
        parsed = make_url(chosen)
    except ArgumentError as e:
        raise ConfigError(
            f"database URL {chosen!r} cannot be parsed ({e}); give sqlite:///PATH or postgresql://USER@HOST/DB"
        ) from e
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.get_backend_name() != "sqlite":
        raise ConfigError(
            f"database URL {parsed.render_as_string(hide_password=True)!r}: only sqlite and postgresql are supported"
        )
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun by SQLAlchemy (below), not by the driver's own rules: savepoints work,
    # and what a transaction reads is still true when it writes.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")  # several processes (server, worker, CLI) share the file
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint of the WAL; safe against corruption
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine for ``url`` (from :func:`database_url`), with SQLite set up for several processes."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        # Each transaction takes the write lock when it begins (waiting up to the busy timeout):
        # a read-then-write can never find the database changed under it. Transactions are short.
        # Read-only ones (``Registry.reading``) take no lock: in WAL mode they never wait.
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def alembic_config(engine: Engine) -> Any:
    """An Alembic config pointing at the packaged migrations (no ``alembic.ini`` needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def head_revision(engine: Engine) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision``, in one transaction where the database allows it."""
    from alembic import command

    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


@dataclass
class Registry:
    """An open registry: its engine and a session factory. Close it when done."""

    engine: Engine
    sessions: sessionmaker[Session]

    def __post_init__(self) -> None:
        self.readers = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work is committed when the block ends, and rolled back if it raises."""
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session that only reads: on SQLite it never waits for a writer (a request's key lookup)."""
        with self.readers.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def open_registry(home: Path, url: str | None = None, *, upgrade_schema: bool = True) -> Registry:
    """The registry of ``home`` (or at ``url``), with its schema at the newest revision.

    Args:
        upgrade_schema: apply pending migrations; with False, a schema behind the code is refused.

    Raises:
        ConfigError: the database cannot be reached, is newer than this code, or is behind and
            ``upgrade_schema`` is False (the message says which command upgrades it).
    """
    chosen = database_url(home, url)
    engine = make_engine(chosen)
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        # SQLite gives its -wal and -shm files the database file's mode: create that one private
        path = Path(engine.url.database)
        if not url and not os.environ.get(URL_ENV):
            private_directory(home)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    shown = engine.url.render_as_string(hide_password=True)
    try:
        current, head = current_revision(engine), head_revision(engine)
        if current != head:
            from alembic.script import ScriptDirectory

            known = {s.revision for s in ScriptDirectory.from_config(alembic_config(engine)).walk_revisions()}
            if current is not None and current not in known:
                raise ConfigError(
                    f"the registry {shown} has schema revision {current}, which this loraforge does not know: "
                    "it was upgraded by a newer version; upgrade loraforge"
                )
            if not upgrade_schema:
                has_tables = bool(inspect(engine).get_table_names())
                state = f"at revision {current}" if current else ("not a registry" if has_tables else "empty")
                raise ConfigError(
                    f"the registry {shown} is {state}, behind this loraforge ({head}); "
                    "run `loraforge registry upgrade` (or start without --no-upgrade)"
                )
            upgrade(engine)
    except OperationalError as e:
        engine.dispose()
        raise ConfigError(f"cannot open the registry {shown}: {e.orig}") from e
    except ConfigError:
        engine.dispose()
        raise
    return Registry(engine, sessionmaker(engine, expire_on_commit=False))
