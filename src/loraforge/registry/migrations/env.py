"""Alembic's entry point for the registry's migrations (run by ``registry.database``, not by hand)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from loraforge.registry.schema import Base

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # `alembic` run by hand against the URL in the config
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as connection:
            _migrate(connection)
        return
    _migrate(connection)


def _migrate(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters a table by copying it
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
