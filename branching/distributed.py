"""Many processes under torchrun: who this process is, the process group, and the few collectives the
project uses. Outside torchrun (or with one process) every function here is a no-op and nothing changes.

Every process runs the same program (SPMD): the parent trains under DistributedDataParallel, extraction and
evaluation are sharded by contiguous index ranges (no padded duplicates) and gathered, independent branches
train on different ranks (`local`: no collectives inside), and only rank 0 writes what the user sees.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from branching.errors import ConfigError

TIMEOUT_ENV = "BRANCHING_DIST_TIMEOUT"
# How long a rank waits for the others at a collective. torchrun ends the job as soon as a rank exits or dies;
# this bounds only a rank that hangs alive, and must exceed the longest wait by design: ranks done with a level
# of branches wait for the rank training the slowest, and the others wait while rank 0 builds the image cache.
DEFAULT_TIMEOUT_S = 3 * 3600

_local_depth = 0  # > 0 inside `local`: this process works alone, no collectives


def world() -> int:
    """Processes in the job: torchrun's WORLD_SIZE, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes outputs and speaks."""
    return rank() == 0


def launched() -> bool:
    """Several processes under torchrun (WORLD_SIZE > 1)."""
    return world() > 1


def start(device: torch.device) -> torch.device:
    """Join the process group (gloo on CPUs, nccl on CUDA) with a bounded timeout and return this rank's device:
    cuda:LOCAL_RANK for a CUDA device, the CPU otherwise. Without torchrun: `device` as it is."""
    if not launched():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this "
                              f"machine but it has {torch.cuda.device_count()} CUDA device(s); give --nproc-per-node "
                              f"{torch.cuda.device_count()} at most (one process per GPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=seconds))
    return device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leads() -> bool:
    """Whether this process decides and writes for the others: rank 0 while work is spread, any process working
    alone (outside torchrun, or inside `local`)."""
    return not sharding() or is_main()


def sharding() -> bool:
    """Whether work is spread over the ranks here: under torchrun, joined, and not inside `local`."""
    return launched() and _local_depth == 0 and dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def local():
    """Inside the block this process works alone (a branch it trains by itself): no sharding, no collectives.
    An exception leaving it is marked as this rank's own (`own_error`): the others did not meet it."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    except BaseException as error:
        error.branching_rank = rank()
        raise
    finally:
        _local_depth -= 1


def working_alone() -> bool:
    """Inside `local` under torchrun: this rank does work of its own."""
    return launched() and _local_depth > 0


def own_error(error: BaseException) -> bool:
    """Whether an error was met by this rank alone, inside `local` (so only this rank can report it)."""
    return getattr(error, "branching_rank", None) == rank()


def shard(n: int) -> slice:
    """This rank's contiguous share of n rows: sizes differ by at most one, every row in exactly one share."""
    if not sharding():
        return slice(0, n)
    r, w = rank(), world()
    return slice(r * n // w, (r + 1) * n // w)


def gather(part):
    """Every rank's `part` (an array, or a tuple or dict of arrays), concatenated in rank order, on every rank."""
    if not sharding():
        return part
    parts = [None] * world()
    dist.all_gather_object(parts, part)
    if isinstance(part, dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in part}
    if isinstance(part, tuple):
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(part)))
    return np.concatenate(parts)


def over_shards(n: int, compute):
    """compute(rows) for this rank's slice of n rows (alone: what it calls does not shard again), gathered whole
    on every rank, outside any inference mode."""
    if not sharding():
        return compute(slice(0, n))
    part = shard(n)
    with local():
        found = compute(part)
    return gather(found)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (on this rank's device), the same on every rank."""
    if not sharding():
        return values
    wire = values.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
    wire = wire.clone()
    dist.all_reduce(wire)
    return wire.to(values.device)


def broadcast(obj, src: int = 0):
    """rank `src`'s object on every rank."""
    if not sharding():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(net: torch.nn.Module) -> None:
    """Rank 0's buffers (batch norm's running statistics) in place on every rank: DistributedDataParallel
    sends them at the start of each step, and the last step's update would otherwise differ by rank."""
    if sharding():
        for buffer in net.buffers():
            dist.broadcast(buffer.data, 0)


def barrier() -> None:
    if sharding():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it builds a cache), the others after it (they find the cache)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
