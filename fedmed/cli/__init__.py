"""The ``fedmed`` command: one module per group of subcommands, ``main`` in fedmed.cli.main."""

from fedmed.cli.main import main

__all__ = ["main"]
