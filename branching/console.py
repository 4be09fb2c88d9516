"""What a command tells the person running it, on standard error (standard output is for results)."""

from __future__ import annotations

import sys

from branching import distributed


def log(message: str) -> None:
    """Said by rank 0 only under torchrun, but for what another rank does alone (a branch it trains), which it
    says itself, marked with its rank."""
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)
    elif distributed.working_alone():
        print(f"[rank {distributed.rank()}] {message}", file=sys.__stderr__, flush=True)
