"""The parent a tree sees over encoded inputs (EncodedNet): a frozen network (a pretrained transformer on texts,
a pretrained CNN on images) has run once per input, and every pooling of each of its taps, up to the deepest
the tree reads, is one slice of the vector the parent reads, (N, sum of the taps' widths x poolings). Its taps
are those (tap, pooling) slices, as an MLP's are (layer, pre or post); its head, when the tree gives the parent
classes, is a small network trained on one of them.
"""

from __future__ import annotations

import torch
from torch import nn


class EncodedNet(nn.Module):
    """Taps are slices of the input, tap-major: for each of `taps` (name, width), one slice per pooling of
    `pools`. The head (where `head` names its (layer, pooling)) is an MLP of `hidden` layers of
    `activation_class`, dropout before its last Linear, reading that slice."""

    def __init__(self, classes: int, taps: list[tuple[str, int]], pools: tuple, head: tuple | None,
                 hidden=(), activation_class=nn.ReLU, dropout=None):
        super().__init__()
        self.pools, self.has_head = tuple(pools), head is not None
        self.feature_info, self.starts, start = [], [], 0
        for i, (name, width) in enumerate(taps):
            for how in self.pools:
                self.feature_info.append({"name": name, "layer": i, "where": how, "shape": (width,), "module": "input"})
                self.starts.append(start)
                start += width
        self.width = start
        self.head_index = self.index(*head) if head is not None else None
        widths, parts = [self.feature_info[self.head_index or 0]["shape"][0], *hidden, classes], []
        for fan_in, fan_out in zip(widths[:-2], widths[1:-1]):
            parts += [nn.Linear(fan_in, fan_out), activation_class()]
        if dropout:
            parts.append(nn.Dropout(dropout))
        self.head = nn.Sequential(*parts, nn.Linear(widths[-2], widths[-1]))

    def index(self, layer: int, how: str) -> int:
        """The feature_info index of tap `layer` pooled by `how`."""
        return layer * len(self.pools) + self.pools.index(how)

    def columns(self, index: int) -> slice:
        """The input's columns of feature_info entry `index`."""
        return slice(self.starts[index], self.starts[index] + self.feature_info[index]["shape"][0])

    def tap(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return x[:, self.columns(index)]

    def forward(self, x):
        return self.head(self.tap(x, self.head_index if self.has_head else 0))

    def forward_intermediates(self, x, indices, stop_early=True):
        return (None if stop_early else self(x)), [self.tap(x, i) for i in indices]
