"""Checks shared by the networks: arguments, inputs, labels, and the size of a declared network (built
on torch's meta device, so that a crafted file or config allocates nothing)."""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from branching.lazy_images import NormalizedImages
from branching.models.kinds import get_kind

MAX_PARAMETERS = 250_000_000  # 1 GiB of float32 weights (4 GiB while training with Adam): far beyond this MLP's uses


def as_2d_float(X, width=None) -> np.ndarray:
    """Array, tensor or [array] -> float32 (N, width); (1, N, w) drops its first axis, (w,) becomes (1, w).
    NormalizedImages pass through as they are (read a batch at a time by whoever iterates them)."""
    if isinstance(X, NormalizedImages):
        if width is not None and X.shape[1] != width:
            raise ValueError(f"expected input of shape (N, {width}), got shape {X.shape}")
        return X
    if isinstance(X, (list, tuple)) and len(X) == 1 and isinstance(X[0], (np.ndarray, torch.Tensor)):
        X = X[0]
    if isinstance(X, torch.Tensor):
        X = X.detach().to("cpu", torch.float32).numpy()
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"input cannot be converted to a float32 array: {first_line(e)}") from e
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        expected = "(N, features)" if width is None else f"(N, {width})"
        raise ValueError(f"expected input of shape {expected}, got shape {arr.shape}")
    return arr


def first_line(error: BaseException) -> str:
    """An error's first line, whole up to 500 characters (then cut with an ellipsis)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 500 else line[:497] + "..."


def check_int(value, name, minimum) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def check_real(value, name, ok, expected) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not ok(value):
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def check_choice(value, choices, name) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_architecture(architecture, kind="mlp") -> list:
    if isinstance(architecture, (str, bytes)) or not isinstance(architecture, (list, tuple, np.ndarray)):
        raise ValueError(f"architecture must be a list of ints [in, hidden..., out]; got {architecture!r}")
    arch = list(architecture)
    if len(arch) < 2 or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in arch):
        raise ValueError(f"architecture must be at least 2 ints, all >= 1; got {arch!r}")
    return [int(w) for w in get_kind(kind).check_architecture(arch)]


def declared_network(kind, architecture, activation="relu", dropout=None, shape=None) -> nn.Module:
    """The network these arguments declare, checked, built on torch's meta device (no weights are
    allocated), and refused if it has more than MAX_PARAMETERS parameters."""
    shape = get_kind(kind).check_shape(shape or {})
    arch = check_architecture(architecture, kind)
    with torch.device("meta"):
        net = get_kind(kind).build(arch, activation, dropout, shape)
    n = sum(p.numel() for p in net.parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"architecture {describe(kind, arch, shape)} has {n:,} parameters ({4 * n / 2**30:.1f} GiB "
                         f"of float32), more than the limit of {MAX_PARAMETERS:,}; use narrower layers")
    return net


def describe(kind, architecture, shape) -> str:
    return str(architecture) if get_kind(kind).lists_layers else f"{kind} {shape}"


def check_state_dict(architecture, activation, dropout, kind, shape, state_dict) -> None:
    """The stored tensors must be exactly those the declared network has (compared on its meta-device
    copy): a file that declares huge layers and stores small tensors would otherwise allocate the huge
    ones before loading fails."""
    declared = declared_network(kind, architecture, activation, dropout, shape)
    described = describe(kind, check_architecture(architecture, kind), get_kind(kind).check_shape(shape or {}))
    expected = {k: tuple(v.shape) for k, v in declared.state_dict().items()}
    if not isinstance(state_dict, dict):
        raise ValueError("state_dict is not a dict")
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state_dict.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))[:1]
        detail = ", ".join(f"{k}: stored {got.get(k, 'nothing')}, declared {expected.get(k, 'nothing')}" for k in wrong)
        raise ValueError(f"the stored tensors do not match the declared architecture {described} ({detail})")
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and v.dtype != torch.float32]
    if bad:
        raise ValueError(f"tensor {bad[0]} is {state_dict[bad[0]].dtype}, not float32")


def as_labels(y, n, n_classes, name) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be a 1-D array of {n} class ids; got shape {y.shape}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class ids; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{name} must be class ids in [0, {n_classes}); got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def writable(arr: np.ndarray) -> np.ndarray:
    """torch.from_numpy warns on read-only arrays (e.g. memory maps); copy those."""
    return arr if arr.flags.writeable else arr.copy()


# float32 inputs of one inference batch at most: 4,096 images of up to 64 pixels fit, so the figures at
# those sizes are those of whole 4,096-image batches (a matmul's last bits depend on its row count)
BATCH_BYTES = 256 * 2**20


def rows_per_batch(batch_size: int, width: int) -> int:
    """batch_size, or fewer rows where that many rows of `width` floats would pass BATCH_BYTES."""
    return max(1, min(batch_size, BATCH_BYTES // (4 * max(1, width))))
