"""Alembic migrations: the only way the synthguard schema is created (see db/migrate.py)."""
