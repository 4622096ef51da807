"""One module per `c2d` subcommand; see srplatform/cli.py for the contract."""

from __future__ import annotations

import sys


def not_available(command: str, issue: str) -> int:
    """Exit path for a command whose implementation has not landed yet: says so, exits 3."""
    print(
        f"c2d {command}: not implemented yet ({issue}). Nothing was done.",
        file=sys.stderr,
    )
    return 3
