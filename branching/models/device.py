"""Where a model runs: a `--device` name checked once and turned into a torch.device, which every
function that trains or runs a model is then given (nothing here is global)."""

from __future__ import annotations

import contextlib
import shutil

import torch

from branching.errors import ConfigError

CPU = torch.device("cpu")


def resolve_device(name="cpu") -> torch.device:
    """"auto" (CUDA when available), "cpu", "cuda" or "cuda:N", or a torch.device, checked."""
    if isinstance(name, torch.device):
        device = name
    else:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {str(name)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"no CUDA device here (torch {torch.__version__}, built for "
                         f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'the CPU only'}); use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"no {device} here: {torch.cuda.device_count()} CUDA device(s); use cuda, cpu or auto")
    return device


def autocast(device: torch.device):
    """bfloat16 autocast on a CUDA device that supports it; otherwise nothing."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def on_device(models, device):
    """Run the models (each a branching Model) on `device` inside the block, and back on the CPU after it:
    inference reads each model's inputs onto its own device and its outputs back to the CPU."""
    device = resolve_device(device)
    models = list(models)
    if device.type == "cpu":
        yield
        return
    try:
        for model in models:
            model.net.to(device)
        yield
    finally:
        for model in models:
            model.net.to(CPU)


def check_compile(device: torch.device) -> None:
    """A ConfigError where this torch cannot compile for `device` (--compile): called before any work."""
    dynamo = getattr(torch, "_dynamo", None)
    if not hasattr(torch, "compile") or dynamo is None or not dynamo.is_dynamo_supported():
        raise ConfigError(f"--compile needs torch.compile, which torch {torch.__version__} does not support on this "
                         f"Python; run without --compile")
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "cl")):
        raise ConfigError("--compile on the CPU needs a C++ compiler (cc, gcc or clang) on PATH; install one, or run "
                         "without --compile")


def compiled(net: torch.nn.Module, device: torch.device):
    """net through torch.compile (checked with check_compile first)."""
    check_compile(device)
    return torch.compile(net)
