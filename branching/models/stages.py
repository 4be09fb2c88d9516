"""A frozen trunk run tap by tap over a batch whose rows can be dropped between taps: what early exits
(branching.tree.cascade) need to pay only for the trunk an answer needs.

`stages(kind, shape, device)` gives an ImageStages (a pretrained CNN, models.trunks) or a TextStages (a transformer,
models.encoder). Each runs in chunks of inputs (`chunks`): `start` a chunk, `advance(depth)` runs its rows that are
left up to tap `depth` - 1 and returns the poolings of the taps it passed, laid out as the kind's `encode` lays them
(tap-major, every pooling of a tap), and `keep(rows)` drops the other rows before the next `advance`. The same
layers run in the same way as `encode` runs them, so a row's columns are those encode gives it in a batch of the
same rows.
"""

from __future__ import annotations

import numpy as np
import torch

from branching.models import encoder as encoders, trunks
from branching.models.text import TEXT_POOLS


class Stages:
    """What a chunk's run tap by tap keeps between calls (`state`, the taps `done`), over a kind's `run` and `cut`."""

    def advance(self, depth: int) -> np.ndarray:
        with torch.inference_mode():
            self.state, pooled = self.run(self.state, self.done, depth)
        self.done = max(self.done, depth)
        return pooled.cpu().numpy()

    def keep(self, rows: np.ndarray) -> None:
        self.state = self.cut(self.state, torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device))


class ImageStages(Stages):
    """A pretrained image network's steps (stem, blocks, head) over flat images (N, 3 * side * side). `begin`, `run`
    and `cut` are the same steps on tensors alone (an exported cascade traces them)."""

    runs_empty = True  # its layers take a batch of no rows (in torch and in onnxruntime)

    def __init__(self, trunk: trunks.Trunk):
        self.trunk = trunk
        self.device = next(trunk.net.parameters()).device
        self.widths = [w for _, w in trunks.tap_widths(trunk.info.name, trunk.size)]
        self.pools = len(trunks.IMAGE_POOLS)

    def module(self) -> torch.nn.Module:
        """What holds the weights these steps run."""
        return self.trunk

    def chunks(self, inputs) -> list[np.ndarray]:
        """Row numbers of the inputs in batches the device holds."""
        rows = trunks.batch_rows(self.trunk.size, self.device)
        return [np.arange(start, min(start + rows, len(inputs))) for start in range(0, len(inputs), rows)]

    def begin(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.prepare(pixels)

    def run(self, x: torch.Tensor, done: int, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Taps done .. depth - 1 from the state after tap done - 1: the new state, and the taps' poolings."""
        pooled = []
        for step in self.trunk.steps[done:depth]:
            x = step(x)
            pooled += [trunks.pool_map(x.float(), how) for how in trunks.IMAGE_POOLS]
        return x, (torch.cat(pooled, dim=1) if pooled else torch.zeros((len(x), 0)))

    def cut(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, index).contiguous(memory_format=torch.channels_last)

    def start(self, inputs, rows: np.ndarray) -> None:
        """Start on images `rows` of `inputs`."""
        self.state = self.begin(torch.from_numpy(np.array(inputs[rows])).to(self.device))
        self.done = 0


class TextStages(Stages):
    """A transformer's embeddings and layers over texts, tokenized and padded a chunk (of similar lengths) at a time.
    `begin` (of token ids and their mask), `run` and `cut` are the same steps on tensors alone."""

    runs_empty = False  # a BERT-like layer reshapes with -1, which a batch of no rows makes ambiguous

    def __init__(self, found: encoders.Encoder):
        self.found, self.device = found, found.device
        self.widths = [found.width] * (found.n_layers + 1)
        self.pools = len(TEXT_POOLS)

    def module(self) -> torch.nn.Module:
        return self.found.model

    def chunks(self, texts) -> list[np.ndarray]:
        self.ids = self.found.tokenize(list(texts))[0]
        return [np.asarray(rows, dtype=np.int64) for rows in self.found.batches(self.ids)]

    def begin(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        """The state at the embeddings: (token states, mask, the other arguments the model passes its layers). Which
        of its tensors are batch-major, and which of their axes are the tokens', is read here, on the inputs' own
        shapes, and kept for `cut` and `first_token` (a traced graph keeps the same choice for any later shapes)."""
        states, args, kwargs = self.found.embed(input_ids, mask)
        state = (states, mask, args, kwargs)
        n, tokens = mask.shape
        self.batch_major = _tensors(state, lambda t: t.ndim >= 2 and t.shape[0] == n)
        self.token_axes = _tensors(state, lambda t: [a for a in range(1, t.ndim) if t.shape[a] == tokens])
        return state

    def run(self, state: tuple, done: int, depth: int) -> tuple[tuple, torch.Tensor]:
        states, mask, args, kwargs = state
        found = []
        for tap in range(done, depth):  # tap 0 is the embeddings, tap i + 1 layer i's output
            if tap:
                states = self.found.run_layer(tap - 1, states, args, kwargs)
            found.append(states)
        pooled = encoders.pool_states(found, mask) if found else torch.zeros((len(mask), 0))
        return (states, mask, args, kwargs), pooled

    def cut(self, state: tuple, index: torch.Tensor) -> tuple:
        """The rows `index` of a BERT-like layer's batch-major arguments (the states, the mask (N, ..., tokens))."""
        return _mapped(state, lambda i, t: t.index_select(0, index) if self.batch_major[i] else t)

    def first_token(self, state: tuple, gone: torch.Tensor) -> tuple:
        """Where `gone` (a boolean tensor), the state of the first token alone, else the state: an exported cascade's
        stand-in row runs on one token (the token axes `begin` found: the states', the mask's, the attention
        mask's)."""
        index = torch.nonzero((torch.arange(state[1].shape[1]) == 0) | ~gone).squeeze(1)

        def first(i, t):
            for axis in self.token_axes[i]:
                t = t.index_select(axis, index)
            return t

        return _mapped(state, first)

    def start(self, inputs, rows: np.ndarray) -> None:
        """Start on texts `rows` of the `inputs` that `chunks` last tokenized."""
        input_ids, mask = encoders.padded([self.ids[r] for r in rows], self.found.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            self.state = self.begin(input_ids.to(self.device), mask.to(self.device))
        self.done = 0


def _mapped(value, fn, count=None):
    """`value` (tensors in tuples, lists and dicts) with fn(i, tensor) in place of its i-th tensor, in a fixed order."""
    count = count if count is not None else iter(range(1 << 30))
    if isinstance(value, (tuple, list)):
        return type(value)(_mapped(v, fn, count) for v in value)
    if isinstance(value, dict):
        return {k: _mapped(v, fn, count) for k, v in value.items()}
    return fn(next(count), value) if torch.is_tensor(value) else value


def _tensors(value, fn) -> list:
    """fn(tensor) for each tensor of `value`, in _mapped's order."""
    found: list = []
    _mapped(value, lambda i, t: found.append(fn(t)) or t)
    return found


def stages(kind, shape: dict, device: torch.device):
    """The staged trunk of an encoded parent of `kind` (its shape keys), on `device`."""
    if kind.reads == "texts":
        return TextStages(encoders.cached(shape["model"], shape["max_length"], device))
    return ImageStages(trunks.cached_trunk(shape, device))


def offsets(widths: list[int], pools: int) -> np.ndarray:
    """The first column of each tap in an encoding (and one past the last)."""
    return np.concatenate([[0], np.cumsum(np.asarray(widths) * pools)]).astype(np.int64)
