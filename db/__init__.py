"""Database layer: typed tables, engine/session helpers and review queries. Never imports ``worker``."""

from __future__ import annotations

import importlib
import importlib.util

from db.base import Base
from db.session import make_engine, make_session_factory, session_scope
from db.tables import Check, Client, Evidence, Review, Verdict

# Webhook tables live in their own module (and migration); importing it registers them on Base.metadata so
# Alembic's autogenerate and `alembic check` see every table.
if importlib.util.find_spec("db.webhook_tables") is not None:
    importlib.import_module("db.webhook_tables")

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
