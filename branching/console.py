"""What a command tells the person running it, on standard error (standard output is for results)."""

from __future__ import annotations

import os
import sys

from branching import distributed

SLOW_SHARE = 0.7  # of a thread's time a run's threads got, below which it says it fought for cores


def log(message: str) -> None:
    """Said by rank 0 only under torchrun, but for what another rank does alone (a branch it trains), which it
    says itself, marked with its rank."""
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)
    elif distributed.working_alone():
        print(f"[rank {distributed.rank()}] {message}", file=sys.__stderr__, flush=True)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (the workers that decode images)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_note(threads: int, cpu_s: float | None = None, wall_s: float | None = None) -> str | None:
    """None, or what to know when torch's threads fought other work for the cores: before a run, from the load
    average; after it, from the CPU time its threads got against the wall time (docs/reliability.md: beside two
    busy processes on a 2-core machine the first run took 128-143 s with 2 threads, 74-78 s with one)."""
    if threads < 2:
        return None
    load = os.getloadavg()[0]
    if cpu_s is None:
        if load + threads <= cores() + 1:  # up to a core's worth of other work: more threads still pay
            return None
        return (f"the machine is busy (load {load:.1f} on {cores()} cores) and torch uses {threads} threads: on a busy "
                f"machine that can be several times slower than one; OMP_NUM_THREADS=1 gives one thread")
    if wall_s is None or wall_s < 30 or cpu_s >= SLOW_SHARE * threads * wall_s:
        return None
    return (f"this run's {threads} threads got {cpu_s:.0f} CPU-s in {wall_s:.0f} s ({100 * cpu_s / (threads * wall_s):.0f}% "
            f"of their time; load {load:.1f} on {cores()} cores): they fought other work for the cores, which can make "
            f"a run several times slower; OMP_NUM_THREADS=1 may be faster here")
