"""The ``synthguard`` command: one click group; each module adds its commands through ``register(group)``."""

from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
