"""Run the Alembic migrations from code (``synthguard db upgrade``, ``scan`` on first use, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` that works from an installed package (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(url: str) -> None:
    """Apply every pending migration to the database at ``url``."""
    command.upgrade(alembic_config(url), "head")


def head_revisions() -> tuple[str, ...]:
    """The head revision(s) of the migration scripts (one, unless branches were left unmerged)."""
    return tuple(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def is_up_to_date(engine: Engine) -> bool:
    """Whether the database behind ``engine`` is at the migration head."""
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current == set(head_revisions())


__all__ = ["MIGRATIONS_DIR", "alembic_config", "head_revisions", "is_up_to_date", "upgrade_to_head"]
