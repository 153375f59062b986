"""The `weft` command: one entry point, a subcommand per component."""

from __future__ import annotations

import errno
import importlib
import logging
import os

import click

from weft.config import ConfigError

# Each module exposes `commands: list[click.Command]`; the stage it belongs to owns it.
_COMMAND_MODULES = ("infra.cli", "probe_agent.cli", "stitcher.cli", "weft.commands")


# The disk said no: the machine's to fix, not a bug to debug.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class _WeftGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        # a bad setting or a full disk is the user's to fix: one sentence, never a traceback
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.errno not in _STORAGE_ERRORS:
                raise
            where = f" {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"cannot write{where}: {exc.strerror}; what was written before "
                                       "is incomplete") from None


@click.group(cls=_WeftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)")
def cli(verbose: int) -> None:
    """Weft: distributed traces from eBPF, across nodes, with no change to the traced programs."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=int(os.environ.get("WEFT_LOG_LEVEL", level)),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _name in _COMMAND_MODULES:
    for _cmd in importlib.import_module(_name).commands:
        cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="weft")
