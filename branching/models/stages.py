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


class ImageStages:
    """A pretrained image network's steps (stem, blocks, head) over flat images (N, 3 * side * side)."""

    def __init__(self, trunk: trunks.Trunk):
        self.trunk = trunk
        self.device = next(trunk.net.parameters()).device
        self.widths = [w for _, w in trunks.tap_widths(trunk.info.name, trunk.size)]
        self.pools = len(trunks.IMAGE_POOLS)

    def chunks(self, inputs) -> list[np.ndarray]:
        """Row numbers of the inputs in batches the device holds."""
        rows = trunks.batch_rows(self.trunk.size, self.device)
        return [np.arange(start, min(start + rows, len(inputs))) for start in range(0, len(inputs), rows)]

    def start(self, inputs, rows: np.ndarray) -> None:
        """Start on images `rows` of `inputs`."""
        self.x = self.trunk.prepare(torch.from_numpy(np.array(inputs[rows])).to(self.device))
        self.done = 0

    def advance(self, depth: int) -> np.ndarray:
        pooled = []
        with torch.inference_mode():
            for step in self.trunk.steps[self.done:depth]:
                self.x = step(self.x)
                pooled += [trunks.pool_map(self.x.float(), how) for how in trunks.IMAGE_POOLS]
        self.done = max(self.done, depth)
        return torch.cat(pooled, dim=1).cpu().numpy() if pooled else np.zeros((len(self.x), 0), np.float32)

    def keep(self, rows: np.ndarray) -> None:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
        self.x = self.x.index_select(0, index).contiguous(memory_format=torch.channels_last)


class TextStages:
    """A transformer's embeddings and layers over texts, tokenized and padded a chunk (of similar lengths) at a time."""

    def __init__(self, found: encoders.Encoder):
        self.found = found
        self.widths = [found.width] * (found.n_layers + 1)
        self.pools = len(TEXT_POOLS)

    def chunks(self, texts) -> list[np.ndarray]:
        self.ids = self.found.tokenize(list(texts))[0]
        return [np.asarray(rows, dtype=np.int64) for rows in self.found.batches(self.ids)]

    def start(self, inputs, rows: np.ndarray) -> None:
        """Start on texts `rows` of the `inputs` that `chunks` last tokenized."""
        input_ids, mask = encoders.padded([self.ids[r] for r in rows], self.found.tokenizer.pad_token_id or 0)
        self.mask = mask.to(self.found.device)
        with torch.inference_mode():
            self.states, self.args, self.kwargs = self.found.embed(input_ids.to(self.found.device), self.mask)
        self.done = 0

    def advance(self, depth: int) -> np.ndarray:
        found = []
        with torch.inference_mode():
            for tap in range(self.done, depth):  # tap 0 is the embeddings, tap i + 1 layer i's output
                if tap:
                    self.states = self.found.run_layer(tap - 1, self.states, self.args, self.kwargs)
                found.append(self.states)
            self.done = max(self.done, depth)
            if not found:
                return np.zeros((len(self.mask), 0), np.float32)
            return encoders.pool_states(found, self.mask).cpu().numpy()

    def keep(self, rows: np.ndarray) -> None:
        n, index = len(self.mask), torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.found.device)

        def cut(value):  # a BERT-like layer's batch-major arguments: the states, the mask (N, ..., tokens)
            if isinstance(value, (tuple, list)):
                return type(value)(cut(v) for v in value)
            batch_major = torch.is_tensor(value) and value.ndim >= 2 and value.shape[0] == n
            return value.index_select(0, index) if batch_major else value

        self.states, self.mask = cut(self.states), cut(self.mask)
        self.args = tuple(cut(a) for a in self.args)
        self.kwargs = {k: cut(v) for k, v in self.kwargs.items()}


def stages(kind, shape: dict, device: torch.device):
    """The staged trunk of an encoded parent of `kind` (its shape keys), on `device`."""
    if kind.reads == "texts":
        return TextStages(encoders.cached(shape["model"], shape["max_length"], device))
    return ImageStages(trunks.cached_trunk(shape, device))


def offsets(widths: list[int], pools: int) -> np.ndarray:
    """The first column of each tap in an encoding (and one past the last)."""
    return np.concatenate([[0], np.cumsum(np.asarray(widths) * pools)]).astype(np.int64)
