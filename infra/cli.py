"""`weft` subcommands of this stage."""

from __future__ import annotations

import click

commands: list[click.Command] = []
