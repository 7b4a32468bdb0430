"""Alembic environment: compares migrations with db.Base.metadata (every table module imported by ``db``)."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, Engine

import db  # imports db.tables and db.webhook_tables, registering every table on Base.metadata
from db.session import make_engine

target_metadata = db.Base.metadata
config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

DEFAULT_DATABASE_URL = "sqlite:///./synthguard.db"
# Migrations wait at most this long for a table lock instead of queueing behind a long transaction
# (and blocking every query queued behind them).
POSTGRES_LOCK_TIMEOUT = "10s"


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    url = os.environ.get("SYNTHGUARD_DATABASE_URL", DEFAULT_DATABASE_URL)
    if url.startswith(("postgresql://", "postgres://")):
        # Same normalisation as worker.settings: this project ships psycopg 3.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    is_sqlite = (connection.dialect.name if connection is not None else (url or "")).startswith("sqlite")
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        transaction_per_migration=True,
        # SQLite cannot ALTER constraints; batch mode recreates the table instead.
        render_as_batch=is_sqlite,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=_database_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET lock_timeout = '{POSTGRES_LOCK_TIMEOUT}'")
        connection.commit()  # the setting is per session; the migrations open their own transactions
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # A caller may hand over an open connection or an engine (pytest-alembic); `synthguard db upgrade`
    # passes only the URL (db.migrate.alembic_config).
    provided = config.attributes.get("connection")
    if isinstance(provided, Connection):
        _run_on(provided)
        return
    engine = provided if isinstance(provided, Engine) else make_engine(_database_url())
    try:
        with engine.connect() as new_connection:
            _run_on(new_connection)
            new_connection.commit()
    finally:
        if provided is None:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
