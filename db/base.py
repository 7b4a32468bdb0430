"""Declarative base shared by every table module (db/tables.py, db/webhook_tables.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase

# Named constraints make migrations reproducible: autogenerate and downgrades can refer to them by name
# on every backend (SQLite included), instead of relying on names the database invents.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSON that becomes JSONB on PostgreSQL (indexable, queryable with ->>), plain JSON text on SQLite.
JSONDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware timestamp, bound in UTC.

    SQLite keeps the text of a datetime without its offset, so a value bound with another offset (a
    ``--since`` of ``13:30+02:00``) would compare as if it were UTC; converting first keeps SQLite and
    PostgreSQL alike. Read back as the underlying type returns it.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            return value.astimezone(UTC)
        return value


# Every timestamp is timezone-aware and stored in UTC.
TZDateTime = UTCDateTime()


def utcnow() -> datetime:
    """Current time in UTC, the only clock the schema uses."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Base class of every ORM table; its ``metadata`` is what Alembic compares against."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute as-is
        uuid.UUID: sa.Uuid(),
        datetime: TZDateTime,
        dict[str, Any]: JSONDocument,
    }
