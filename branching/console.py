"""What a command tells the person running it, on standard error (standard output is for results)."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
