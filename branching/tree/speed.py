"""Inference speed: the original study's style, batched extraction and the routed tree, measured alike.

Used by benchmarks/bench_inference.py. Every mode answers the same question (which class, how
sure) so that their outputs can be checked against each other before they are timed.
"""

from __future__ import annotations

import ctypes
import re
import resource
import time
from pathlib import Path

import numpy as np
import torch

from branching.data.normalization import Normalizer
from branching.models import nets
from branching.models.forward import chain
from branching.models.meta import NodeMeta
from branching.models.model import Model
from branching.tree import cost
from branching.tree.routing import TreePredictor


def chain_models(models: dict[str, Model], leaf: str) -> list[Model]:
    """The models from the parent down to `leaf`."""
    return [models[name] for name in chain(models, leaf)]


def original_style(chain: list[Model], normalizer: Normalizer, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As the original's test scripts: one image at a time, each model on the way run whole with a
    forward hook catching the layer the next one reads, then the branch. Returns (classes, confidences)."""
    predicted, confidence = np.empty(len(images), np.int64), np.empty(len(images), np.float32)
    for i, image in enumerate(images):
        x = torch.tensor(((image.astype(np.float32) - normalizer.mean) / normalizer.std)[None])
        with torch.no_grad():
            for source, reader in zip(chain[:-1], chain[1:]):
                caught = {}
                module = source.net.get_submodule(source.tap(reader.meta.layer, reader.meta.where)["module"])
                hook = module.register_forward_hook(
                    lambda module, inputs, output: caught.__setitem__("x", output))
                source.net(x)
                hook.remove()
                x = nets.pool(caught["x"], reader.meta.pool or "flat")
            probabilities = torch.softmax(chain[-1].net(x), dim=1)[0].numpy()
        predicted[i], confidence[i] = probabilities.argmax(), probabilities.max()
    return predicted, confidence


def batched_extraction(chain: list[Model], normalizer: Normalizer, images: np.ndarray,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """torchly's batched get_activations along the chain (each model only up to the layer read), then the branch."""
    x = normalizer.transform(images)
    for source, reader in zip(chain[:-1], chain[1:]):
        x = source.get_activations(x, layer=reader.meta.layer, where=reader.meta.where,
                                   pool=reader.meta.pool, batch_size=batch_size)
    probabilities = chain[-1].predict_proba(x)
    return probabilities.argmax(axis=1), probabilities.max(axis=1)


def chain_flops(chain: list[Model], full: bool) -> int:
    """Forward FLOPs per image along a chain (as torch counts them): every model whole (full) or only up
    to the layer the next one reads."""
    total = 0
    for source, reader in zip(chain[:-1], chain[1:]):
        x = torch.zeros(1, source.architecture[0])
        total += cost.counted(lambda: source.net(x) if full else
                              source.hidden_forward(x, reader.meta.layer, reader.meta.where))
    return total + cost.counted(lambda: chain[-1].net(torch.zeros(1, chain[-1].architecture[0])))


def seconds_per_call(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_pass(shapes: list[tuple[int, int, int]], dtype=torch.float32):
    """A function that runs torch.matmul once on each shape (rows x fan_in) @ (fan_in x fan_out), on
    inputs made here; timing it gives what plain matrix products need for those shapes."""
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(rows, fan_in, generator=generator).to(dtype),
              torch.randn(fan_in, fan_out, generator=generator).to(dtype))
             for rows, fan_in, fan_out in shapes if rows]

    def run() -> None:
        with torch.inference_mode():
            for a, b in pairs:
                torch.matmul(a, b)
    run()
    return run


def routed_shapes(predictor: TreePredictor, reached: dict[str, int], n: int, batch_size: int):
    """The matmul shapes of one batch of the routed tree: each node's Linears on the share of images it sees."""
    shapes = []
    for name, layers in predictor.layer_shapes().items():
        rows = round(batch_size * reached[name] / n)
        shapes += [(rows, fan_in, fan_out) for fan_in, fan_out in layers]
    return shapes


# ---- memory ----------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_free_memory() -> None:
    """Hand memory freed earlier back to the system (glibc keeps it), so the next peak is the next call's own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn) -> tuple[object, float | None, float]:
    """(fn(), peak resident memory above the start while fn ran (MiB; None where it cannot be reset),
    peak resident memory of the process so far (MiB))."""
    _release_free_memory()
    start = _status_kib("VmRSS")
    try:
        _CLEAR_REFS.write_text("5")  # resets the high-water mark (Linux)
        resettable = start is not None
    except OSError:
        resettable = False
    result = fn()
    high = _status_kib("VmHWM") if resettable else None
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = (high - start) / 1024 if high is not None else None
    return result, extra, rusage


def random_tree(config, seed: int = 0) -> dict[str, Model]:
    """Untrained models of a config's shapes (for timing when no trained tree is at hand)."""
    rng = np.random.default_rng(seed)
    pixels = config.input_width
    norm = Normalizer(rng.uniform(100, 150, pixels), rng.uniform(40, 70, pixels))
    models: dict[str, Model] = {}
    for i, spec in enumerate(config.nodes()):
        where = None if spec.source is None else models[spec.source].net_kind.branch_where(spec.where, "pre")
        width = pixels if spec.source is None else models[spec.source].width(spec.layer, where, spec.pool)
        model = Model(spec.net_kind.architecture(width, spec.hidden, len(spec.classes)), activation=spec.activation,
                      seed=seed + i, kind=spec.kind, shape=spec.shape_dict)
        if spec.source is None:
            model.meta = NodeMeta("parent", spec.name, list(spec.classes), normalization=norm.to_dict())
        else:
            model.meta = NodeMeta("branch", spec.name, list(spec.classes), source=spec.source, layer=spec.layer,
                                  where=where, pool=spec.pool)
        models[spec.name] = model.freeze()
    return models
