"""Database layer: typed tables, engine/session helpers and review queries. Never imports ``worker``."""

from __future__ import annotations

# Webhook tables live in their own module (and migration); importing it registers them on Base.metadata so
# Alembic's autogenerate and `alembic check` see every table.
from db import webhook_tables as webhook_tables
from db.base import Base
from db.session import make_engine, make_session_factory, session_scope
from db.tables import Check, Client, Evidence, Review, Verdict

__all__ = [
    "Base",
    "Check",
    "Client",
    "Evidence",
    "Review",
    "Verdict",
    "make_engine",
    "make_session_factory",
    "session_scope",
]
