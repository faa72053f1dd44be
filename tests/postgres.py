"""PostgreSQL fixtures (imported by tests/conftest.py): the local server, a new database per test, dropped afterwards.

The server is ``$LORAFORGE_TEST_POSTGRES_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``
(trust authentication, as CI and development machines run it). Where none answers, the PostgreSQL
cases are skipped with that reason; the SQLite cases always run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from loraforge.registry.database import database_url, make_engine

SERVER = os.environ.get("LORAFORGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = database_url(tmp_path_factory.mktemp("unused"), SERVER)
    engine = make_engine(url)
    try:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as e:  # no server, refused, wrong credentials: say which, and skip
        pytest.skip(f"no PostgreSQL answers at {SERVER} ({type(e).__name__}); only SQLite is tested")
    finally:
        engine.dispose()
    yield url


@pytest.fixture
def fresh_postgres_url(postgres_server: str) -> Iterator[str]:
    """The URL of a new, empty database on the local server, dropped after the test."""
    name = f"loraforge_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(postgres_server)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
