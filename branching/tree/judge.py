"""A self-evaluation branch ("judge"): a small MLP that gives the probability that its node's answer
is right, and its checkpoint OUT/models/<node>.selfeval.pt.

The judge reads taps of what its node reads (the parent's own taps for the parent, the source's taps
for a branch: all computed anyway on the way to the node's answer, so judging costs one small MLP),
concatenated, plus the node's logits and its softmax probabilities sorted from the largest (class-free
summaries of how decided the answer is). Its inputs are standardised with statistics of its training
rows, stored in the checkpoint. Training (cross-fitted correctness labels) is branching.selfeval's job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.special
import torch
from torch import nn

from branching.acceptance.rule import Acceptance
from branching.errors import CheckpointError
from branching.models.forward import extract, node_inputs, read
from branching.models.meta import JudgeMeta
from branching.models.model import Model
from branching.tree.checkpoint import read_model

SUFFIX = ".selfeval.pt"
MIN_STD = 1e-6  # features constant on the training rows are only centred
MIN_FOLD_STD = 1e-3  # below this, dividing weights by the std loses too much precision
# A small judge on few rows multiplies with numpy, whose per-operation cost is a fraction of torch's (it
# dominates one image at a time). numpy's BLAS (OpenBLAS in its wheels) keeps a product on one thread
# below 9,216 matrix elements (matrix-vector) and 262,144 multiply-adds (matrix-matrix): the limits
# below stay under both, so torch's thread setting is not bypassed.
NUMPY_WEIGHTS = 8192   # elements of the judge's largest weight matrix
NUMPY_PRODUCT = 65536  # rows times the judge's multiply-adds per row


def path_of(models_dir, node: str) -> Path:
    return Path(models_dir) / f"{node}{SUFFIX}"


def is_judge_file(path) -> bool:
    return Path(path).name.endswith(SUFFIX)


def judge_reads(models: dict[str, Model], node: str, spec, default_where: str = "pre") -> list[tuple]:
    """(source, layer, where, pool) of each tap a judge of `node` (config.SelfEvalSpec `spec`) reads."""
    source = "parent" if node == "parent" else models[node].meta.source
    where = models[source].net_kind.branch_where(spec.where, default_where)
    return [read(models, source, layer, where, spec.pool) for layer in spec.layers]


def inputs(taps: list[np.ndarray], logits, use_logits: bool) -> np.ndarray:
    """A judge's input rows: the taps side by side, then (use_logits) the logits and the softmax sorted
    from the largest."""
    parts = [np.asarray(t, dtype=np.float32) for t in taps]
    if use_logits:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        parts += [logits, ascending_softmax(logits)[:, ::-1]]
    return np.concatenate(parts, axis=1)


def ascending_softmax(logits: np.ndarray) -> np.ndarray:
    """The softmax of float32 logits (N, K), each row sorted ascending: the softmax of the sorted logits,
    whose largest is the last (the same values as sorting the softmax, in fewer operations)."""
    p = np.sort(logits, axis=1)
    p -= p[:, -1:]
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    return p


def standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = X.mean(axis=0), X.std(axis=0)
    return mean.astype(np.float32), np.where(std < MIN_STD, 1.0, std).astype(np.float32)


class Judge:
    """A trained judge: `probability_of(taps, logits)` of being right, float32 (N,)."""

    def __init__(self, model: Model):
        meta = model.meta
        self.model = model
        self.node = meta.judges
        self.reads = list(meta.reads)
        self.tap_widths = meta.tap_widths  # recorded at training (absent in older judges)
        self.use_logits = bool(meta.logits)
        self.mean, self.std = meta.feature_mean, meta.feature_std
        self.flops = 2 * sum(a * b for a, b in zip(model.architecture[:-1], model.architecture[1:]))
        # laid out for x @ W, the standardisation folded into the first layer where that keeps precision
        # (as routing does with the parent's normalisation): the judge costs a few matrix products
        linears = [m for m in model.net if isinstance(m, nn.Linear)]
        self.weights = [(m.weight.detach().t().contiguous(), m.bias.detach().numpy().astype(np.float32))
                        for m in linears]
        self.folded = float(self.std.min()) >= MIN_FOLD_STD
        if self.folded:  # W (x - m) / s + b == (W / s) x + (b - (W / s) m)
            w, b = self.weights[0]
            w = w / torch.from_numpy(self.std)[:, None]
            self.weights[0] = (w.contiguous(), b - (torch.from_numpy(self.mean) @ w).numpy())
        # softmax of two logits: the second's probability is the logistic function of their difference,
        # so the last layer keeps one column: the difference
        w, b = self.weights[-1]
        self.weights[-1] = ((w[:, 1:] - w[:, :1]).contiguous(), np.ascontiguousarray(b[1:] - b[:1]))
        self.biases = [torch.from_numpy(b) for _, b in self.weights]
        self.act = model.net[1] if len(linears) > 1 and model.activation != "relu" else None
        self.macs = sum(w.numel() for w, _ in self.weights)
        self.numpy_rows = NUMPY_PRODUCT // self.macs if max(w.numel() for w, _ in self.weights) <= NUMPY_WEIGHTS else 0
        self.numpy_weights = [(w.numpy(), b) for w, b in self.weights[1:]]  # views of the same memory
        self._blocks: dict[tuple, list[torch.Tensor]] = {}
        self._numpy_blocks: dict[tuple, list[np.ndarray]] = {}

    def probability_of(self, taps: list[np.ndarray], logits) -> np.ndarray:
        """P(right) from the judge's taps (N, width each) and the node's raw logits: `inputs` then the MLP.
        A folded judge (standardisation folded into its first layer) does not build the inputs: its first
        layer is a sum of one product per part (no copy of wide taps), and the softmax is taken of the
        ascending-sorted logits (the same values as the sorted softmax) against its rows stored reversed.
        Few operations: one image at a time, their count is the cost."""
        if not self.folded:
            parts = [(inputs(taps, logits, self.use_logits) - self.mean) / self.std]
        else:
            parts = [t if t.dtype == np.float32 and t.flags.c_contiguous else np.ascontiguousarray(t, np.float32)
                     for t in taps]
            if self.use_logits:
                logits = np.ascontiguousarray(logits, dtype=np.float32)
                parts += [logits, ascending_softmax(logits)]
        blocks = self._blocks.get(widths := tuple(part.shape[1] for part in parts)) or self._layout(widths)
        if len(parts[0]) <= self.numpy_rows:  # the same products in numpy (see NUMPY_PRODUCT)
            blocks = self._numpy_blocks[widths]
            a = parts[0] @ blocks[0]
            for part, block in zip(parts[1:], blocks[1:]):
                a += part @ block
            a += self.weights[0][1]
            for w, b in self.numpy_weights:
                a = np.maximum(a, 0, out=a) if self.act is None else self.act(torch.from_numpy(a)).numpy()
                a = a @ w
                a += b
            return scipy.special.expit(a[:, 0])
        a = torch.addmm(self.biases[0], torch.from_numpy(parts[0]), blocks[0])
        for part, block in zip(parts[1:], blocks[1:]):
            a.addmm_(torch.from_numpy(part), block)
        for (w, _), b in zip(self.weights[1:], self.biases[1:]):
            a = torch.relu_(a) if self.act is None else self.act(a)
            a = torch.addmm(b, a, w)
        return scipy.special.expit(a.numpy()[:, 0])

    def _layout(self, widths: tuple) -> list[torch.Tensor]:
        """The first layer's rows cut into one block per input part (a folded judge's sorted softmax
        block reversed: it is given ascending)."""
        w = self.weights[0][0]
        parts = 1 if not self.folded else len(self.reads) + 2 * self.use_logits
        taps_ok = not self.folded or self.tap_widths is None or list(widths[:len(self.reads)]) == self.tap_widths
        if not (sum(widths) == w.shape[0] and len(widths) == parts and taps_ok
                and (not (self.folded and self.use_logits) or widths[-1] == widths[-2])):
            raise ValueError(f"judge of {self.node!r} takes {w.shape[0]} inputs from {len(self.reads)} taps"
                             f"{' and the logits' if self.use_logits else ''}; got parts of widths {widths}")
        ends = np.cumsum(widths)
        blocks = [w[end - width:end].contiguous() for width, end in zip(widths, ends)]
        if self.use_logits and self.folded:
            blocks[-1] = blocks[-1].flip(0).contiguous()
        self._blocks[widths] = blocks
        self._numpy_blocks[widths] = [block.numpy() for block in blocks]
        return blocks

    def score_images(self, models: dict[str, Model], X: np.ndarray, logits=None) -> np.ndarray:
        """Probabilities for normalised images X through the generic forward path (branching.forward)."""
        if logits is None:
            logits = models[self.node].logits(node_inputs(models, self.node, X))
        return self.probability_of(extract(models, self.reads, X), logits)


def save(models_dir, node: str, model: Model, meta: JudgeMeta) -> Path:
    path = path_of(models_dir, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path, meta=meta.replace(fingerprint=model.fingerprint()))
    return path


def load(models_dir, node: str, judged: Model) -> Judge:
    """The judge of `node` beside its model, checked to have been trained for exactly that model."""
    path = path_of(models_dir, node)
    fix = f"train the tree again with `branching run` (its [{_table(node)}.selfeval] table trains it)"
    if not path.exists():
        raise CheckpointError(f"no self-evaluation branch for {node!r} at {path}, which its acceptance score "
                              f"needs; {fix}")
    model = read_model(path, fix)
    meta = model.meta
    if not isinstance(meta, JudgeMeta) or meta.judges != node:
        raise CheckpointError(f"{path} is not the self-evaluation branch of {node!r}; {fix}")
    if meta.node_fingerprint != judged.fingerprint():
        raise CheckpointError(f"{path} judges another model than {judged.meta.path or node} (fingerprint "
                              f"{meta.node_fingerprint} against {judged.fingerprint()}); {fix}")
    return Judge(model)


def load_for(models: dict[str, Model], node: str) -> Judge | None:
    """The judge a node's acceptance uses (None unless its score is "selfeval"), from its model's folder."""
    model = models[node]
    if Acceptance.of(model.meta).score != "selfeval":
        return None
    if model.meta.path is None:
        raise CheckpointError(f"the model of {node!r} was not loaded from a file, so its self-evaluation branch "
                              f"cannot be found; load the tree from its models folder")
    return load(Path(model.meta.path).parent, node, model)


def _table(node: str) -> str:
    return "parent" if node == "parent" else f"branches.{node}"
