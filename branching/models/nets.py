"""The networks trained from scratch that a model can be: an MLP on flattened pixels (the original), a small CNN
and a small ViT (the kinds that build them are in branching.models.kinds).

Every network takes flat inputs (N, in_width); the CNN and the ViT view them as images (N, 3, side, side),
the side given by in_width = 3 * side * side (32 for CIFAR, the data's image_size otherwise).
Each declares, as timm's models do, the points where it can be tapped (`feature_info`: name, shape of
one image's tensor there, the module producing it) and computes any of them in one pass
(`forward_intermediates`). `pool` turns a tapped tensor into the vector a branch reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WHERE = ("pre", "post")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}
CHANNELS = 3
SIDE = 32  # CIFAR's images, and the size of a tree's images unless its [data] image_size says otherwise
# how a tapped tensor becomes a vector: by the rank of one image's tensor
POOLS = {1: ("flat",), 3: ("avg", "avg2x2", "max", "flat"), 2: ("cls", "mean", "flat")}


class MLPNet(nn.Sequential):
    """Per hidden layer Linear -> activation [-> Dropout], then a final Linear. Taps: each hidden layer
    before ("pre") and after ("post") its activation."""

    def __init__(self, architecture, activation="relu", dropout=None):
        layers = []
        for fan_in, fan_out in zip(architecture[:-2], architecture[1:-1]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(architecture[-2], architecture[-1]))
        super().__init__(*layers)
        stride = 3 if dropout else 2
        self.feature_info = [{"name": f"hidden{i}.{where}", "layer": i, "where": where, "shape": (width,),
                              "module": str(i * stride + (0 if where == "pre" else 1))}
                             for i, width in enumerate(architecture[1:-1]) for where in WHERE]

    def __getitem__(self, index):
        if isinstance(index, slice):  # nn.Sequential would rebuild this class from the slice
            return nn.Sequential(*list(self)[index])
        return super().__getitem__(index)

    def forward_intermediates(self, x, indices, stop_early=True):
        stops = [int(self.feature_info[i]["module"]) + 1 for i in indices]
        end = max(stops, default=0) if stop_early else len(self)
        found = {}
        for i, module in enumerate(list(self)[:end], start=1):
            x = module(x)
            found[i] = x
        return (None if stop_early else x), [found[s] for s in stops]


class ConvNet(nn.Module):
    """Stages of `depth` x (3x3 conv, batch norm, ReLU), the resolution halved (max pooling) before every
    stage but the first; global average pooling, dropout and a Linear head. Taps: each stage's output."""

    def __init__(self, classes, widths=(32, 64, 128), depth=2, dropout=None, side=SIDE):
        super().__init__()
        if side < 2 ** (len(widths) - 1):
            raise ValueError(f"cnn: {len(widths)} stages halve a {side}-pixel image {len(widths) - 1} times, to "
                             f"nothing; use fewer widths or a larger image_size")
        self.image = (CHANNELS, side, side)
        channels, stages = CHANNELS, []
        self.feature_info = []
        for i, width in enumerate(widths):
            layers = [nn.MaxPool2d(2)] if i else []
            side = side // 2 if i else side
            for _ in range(depth):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            stages.append(nn.Sequential(*layers))
            self.feature_info.append({"name": f"stage{i}", "layer": i, "where": None, "shape": (width, side, side),
                                      "reduction": self.image[1] // side, "module": f"stages.{i}"})
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout or 0.0),
                                  nn.Linear(channels, classes))
        # channels_last: convolutions run in it about 1.3x faster on a CPU (oneDNN) and on tensor cores
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.forward_intermediates(x, [], stop_early=False)[0]

    def forward_intermediates(self, x, indices, stop_early=True):
        x = x.reshape(-1, *self.image).contiguous(memory_format=torch.channels_last)
        end = max(indices, default=-1) + 1 if stop_early else len(self.stages)
        found = []
        for stage in self.stages[:end]:
            x = stage(x)
            found.append(x)
        return (None if stop_early else self.head(x)), [found[i] for i in indices]


class ViTNet(nn.Module):
    """A vision transformer: patch embedding, a class token, learned positions, `depth` pre-norm
    transformer blocks, a final LayerNorm and a Linear head on the class token. Taps: each block's output
    tokens (class token first)."""

    def __init__(self, classes, dim=96, depth=4, heads=4, patch=4, mlp_ratio=2, dropout=None, side=SIDE):
        super().__init__()
        if side % patch or dim % heads:
            raise ValueError(f"vit: patch {patch} must divide {side} (the image's side) and heads {heads} must "
                             f"divide dim {dim}")
        self.image = (CHANNELS, side, side)
        tokens = (side // patch) ** 2 + 1  # the patch grid, plus the class token
        self.embed = nn.Conv2d(CHANNELS, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout or 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.feature_info = [{"name": f"block{i}", "layer": i, "where": None, "shape": (tokens, dim),
                              "module": f"blocks.{i}"} for i in range(depth)]

    def forward(self, x):
        return self.forward_intermediates(x, [], stop_early=False)[0]

    def forward_intermediates(self, x, indices, stop_early=True):
        x = self.embed(x.reshape(-1, *self.image)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        end = max(indices, default=-1) + 1 if stop_early else len(self.blocks)
        found = []
        for block in self.blocks[:end]:
            x = block(x)
            found.append(x)
        return (None if stop_early else self.head(self.norm(x)[:, 0])), [found[i] for i in indices]


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)) (GELU)."""

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim),
                                 nn.Dropout(dropout))

    def forward(self, x):
        n, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, tokens, dim))
        return x + self.mlp(self.norm2(x))


def image_side(width: int) -> int:
    """The side of the square RGB images that flatten to `width` numbers."""
    side = math.isqrt(width // CHANNELS)
    if width < CHANNELS or CHANNELS * side * side != width:
        raise ValueError(f"{width} inputs are not a square RGB image (3 x side x side)")
    return side


def image_width(side: int) -> int:
    """The flat width of one square RGB image of `side` pixels."""
    return CHANNELS * side * side


# ---- pooling a tapped tensor -------------------------------------------------------------------

def default_pool(shape) -> str:
    """The pooling a branch uses when its config names none: a vector as it is, a feature map averaged
    over its positions, a token sequence's class token."""
    return POOLS[len(shape)][0]


def check_pool(shape, how: str) -> str:
    if how not in POOLS[len(shape)]:
        kind = {1: "a vector", 2: "a token sequence", 3: "a feature map"}[len(shape)]
        raise ValueError(f"pool {how!r} does not fit {kind} of shape {tuple(shape)}; use one of "
                         f"{', '.join(POOLS[len(shape)])}")
    return how


def pooled_width(shape, how: str) -> int:
    """The width of the vector `pool` makes of one image's tensor of `shape`."""
    check_pool(shape, how)
    if how == "flat":
        return math.prod(shape)
    if how == "avg2x2":
        return shape[0] * 4
    return shape[-1] if len(shape) == 2 else shape[0]


def pool(tensor: torch.Tensor, how: str) -> torch.Tensor:
    """A batch of tapped tensors (N, ...) as vectors (N, width)."""
    if how == "flat":
        return tensor.flatten(1) if tensor.dim() > 2 else tensor
    if how == "avg":
        return tensor.mean(dim=(2, 3))
    if how == "max":
        return tensor.amax(dim=(2, 3))
    if how == "avg2x2":
        return F.adaptive_avg_pool2d(tensor, 2).flatten(1)
    if how == "cls":
        return tensor[:, 0]
    if how == "mean":
        return tensor[:, 1:].mean(dim=1)
    raise ValueError(f"unknown pool {how!r}")
