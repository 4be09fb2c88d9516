"""`compare`'s fine-tuning on a pretrained image parent: the block whose output the branch reads and the trained
branch on it, fine-tuned together on the branch's classes (the parent stays as it was).

Fine-tuning the whole network does not fit a CPU's budget; one block does. The feature maps that enter that
block are computed once (the frozen blocks below it), then each epoch runs only the copy of that block, the
branch's pooling and standardisation, and the branch: the same arithmetic as the frozen path at the start,
every step a gradient through the block. The copy's batch norm keeps the statistics it was pretrained with
(eval mode), as is usual when fine-tuning on small batches, and its stochastic depth is off. No mirror images:
the feature maps are computed once, for the images as they are. The method is left out where those maps would
take more than MAX_STATES_BYTES (an early block at a large input size).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from branching.console import log
from branching.models import trunks
from branching.studies.baselines import Outcome, SeedContext
from branching.studies.finetune_loop import fine_tune, trainable
from branching.train.nodes import branch_read, parent_normalizer
from branching.tree import cost

MAX_STATES_BYTES = 2 * 2**30  # float32 feature maps entering the block, for the branch's images (train and test)
BATCH = 64


class OneBlock(nn.Module):
    """A trainable copy of step `tap` of a trunk (a block, or the head's convolution), the branch's pooling over
    positions, the parent's standardisation of that tap, and a trainable copy of the branch."""

    def __init__(self, trunk: trunks.Trunk, tap: int, how: str, mean: np.ndarray, std: np.ndarray, branch: nn.Module):
        super().__init__()
        net = trunk.net
        if tap == 0 or tap > len(net._blocks) + 1:
            raise ValueError(f"tap {tap} has no block of its own to fine-tune")
        self.block = copy.deepcopy(net._blocks[tap - 1]) if tap <= len(net._blocks) else \
            nn.ModuleList([copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1), copy.deepcopy(net._swish)])
        self.how = how
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, np.float32)))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, np.float32)))
        self.branch = copy.deepcopy(branch)
        self.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.block.modules():  # batch norm keeps its pretrained statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.block, nn.ModuleList):
            x = states
            for layer in self.block:
                x = layer(x)
        else:
            x = self.block(states, drop_connect_rate=None)
        return self.branch((trunks.pool_map(x, self.how) - self.mean) / self.std)


def states_bytes(shape: dict, tap: int, n: int) -> int:
    """Bytes of the float32 feature maps entering tap `tap` for n images."""
    with torch.device("meta"):
        trunk = trunks.Trunk(trunks.build(shape["model"], shape["input_size"]), trunks.network(shape["model"]),
                             shape["input_size"])
        maps = trunk.forward_taps(torch.empty(1, 3, shape["input_size"], shape["input_size"]), tap)
    return 4 * n * maps[-1][0].numel()


def affordable(ctx: SeedContext, spec) -> bool:
    """Whether the feature maps entering the branch's block fit MAX_STATES_BYTES (see the module's doc)."""
    tap = branch_read(ctx.models, spec, ctx.recipes.default.branch)[1]
    n = len(ctx.data.node_labels("train", spec)[1]) + len(ctx.data.node_labels("test", spec)[1])
    return tap > 0 and states_bytes(ctx.models["parent"].shape, tap, n) <= MAX_STATES_BYTES


def entering_states(trunk: trunks.Trunk, pixels: np.ndarray, tap: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(rows, feature maps entering step `tap`) per batch of BATCH images, computed once."""
    out = []
    device = next(trunk.net.parameters()).device
    with torch.no_grad():  # not inference_mode: the maps enter a block that trains
        for start in range(0, len(pixels), BATCH):
            batch = torch.from_numpy(np.array(pixels[start:start + BATCH])).to(device)
            maps = trunk.forward_taps(trunk.prepare(batch), tap)
            out.append((np.arange(start, start + len(batch)), maps[-1]))
    return out


def run_finetune_block(ctx: SeedContext, spec) -> Outcome:
    """compare's "finetune" on a pretrained image parent (see the module's doc), from the trained branch
    ctx.models[spec.name], as for the other parents."""
    parent, branch = ctx.models["parent"], ctx.models[spec.name]
    _, tap, how, _ = branch_read(ctx.models, spec, ctx.recipes.default.branch)
    trunk = trunks.load_trunk(parent.shape, ctx.device)
    normalizer = parent_normalizer(parent)
    columns = parent.net.columns(parent.net.index(tap, how))
    net = OneBlock(trunk, tap, how, normalizer.mean[columns], normalizer.std[columns], branch.net).to(ctx.device)
    tap_name = parent.tap(tap, how)["name"]
    log(f"{spec.name}: fine-tuning {tap_name} of {parent.shape['model']} with the branch ({trainable(net):,} "
        f"parameters) on its training images; the blocks below run once")

    def entering(split, rows, generator):
        """The training images in batches of a seeded order, the others in theirs."""
        order = np.arange(len(rows)) if generator is None else generator.permutation(len(rows))
        batches = entering_states(trunk, ctx.data.raw_images[split][rows[order]], tap)
        return [(order[positions], states) for positions, states in batches]

    flops = cost.flops_to(ctx.models, (spec.source, tap, how)) + cost.linear_flops(branch.architecture)
    return fine_tune(ctx, spec, net, entering, flops, {"layer": tap_name, "pool": how})
