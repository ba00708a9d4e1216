"""The ``graphfix`` command line: one module per command, report rendering's baselines and the CI gate."""

from graphfix.cli.app import main

__all__ = ["main"]
