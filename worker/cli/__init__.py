"""The ``synthguard`` command: one click group; each module adds its commands through ``register(group)``."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click


class _Group(click.Group):
    """Turns a database error in the middle of a command into one line on stderr, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = _database_error(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


def _database_error(exc: Exception) -> str | None:
    """One line for a database that failed or was busy mid-command (SQLite: another process held the write
    lock past the 30 s wait); None for every other error. Only the driver's first line: no SQL, no values."""
    if "sqlalchemy" not in sys.modules:
        return None  # a command that never touched a database
    from sqlalchemy.exc import OperationalError  # noqa: PLC0415 - only where SQLAlchemy is loaded already

    if not isinstance(exc, OperationalError):
        return None
    first_line = (str(exc.orig).strip().splitlines() or ["unknown error"])[0]
    hint = " (another process kept the SQLite database busy; try again)" if "locked" in first_line else ""
    return f"database error: {first_line}{hint}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """synthguard: detect AI-generated images; moderation worker, scanner and review tools.

    Settings come from SYNTHGUARD_* environment variables (see the README); `synthguard scan` works
    without any, using the SQLite file ./synthguard.db.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


from worker.cli import clients_cmds, models_cmds, pipeline_cmds, webhook_cmds  # noqa: E402 - after `main` exists

for _module in (pipeline_cmds, models_cmds, webhook_cmds, clients_cmds):
    _module.register(main)

__all__ = ["main"]
