"""The ``synthguard`` command: one click group; each module adds its commands through ``register(group)``."""

from __future__ import annotations

import importlib
import importlib.util
import logging

import click

# Modules owned by different parts of the project; each exposes register(group: click.Group) -> None.
COMMAND_MODULES = ("worker.cli.pipeline_cmds", "worker.cli.models_cmds", "worker.cli.webhook_cmds")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """synthguard: detect AI-generated images; moderation worker, scanner and review tools.

    Settings come from SYNTHGUARD_* environment variables (see the README); `synthguard scan` works
    without any, using the SQLite file ./synthguard.db.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _module_name in COMMAND_MODULES:
    # Guard only while a module is still being written by its owner; a module that exists must import.
    if importlib.util.find_spec(_module_name) is not None:
        importlib.import_module(_module_name).register(main)

__all__ = ["main"]
