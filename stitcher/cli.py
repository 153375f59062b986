"""`weft` subcommands of this stage."""

from __future__ import annotations

import click

commands: list[click.Command] = []

from stitcher.app import stitch_command  # noqa: E402 - H2b: `weft stitch`

commands.append(stitch_command)

from stitcher.replay import replay_command  # noqa: E402 - H2b: `weft replay`

commands.append(replay_command)

from stitcher.rebuild import rebuild_command  # noqa: E402 - H2a: `weft rebuild`
from stitcher.show import show_command  # noqa: E402 - H2a: `weft show`
from stitcher.simulate import simulate_command  # noqa: E402 - H2a: `weft simulate`
from stitcher.verify import verify_command  # noqa: E402 - H2a: `weft verify`

commands.extend([rebuild_command, show_command, simulate_command, verify_command])
