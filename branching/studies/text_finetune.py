"""`compare`'s fine-tuning of a text parent: the transformer layer whose output the branch reads, and the
trained branch on it, fine-tuned together on the branch's classes (the parent stays as it was).

Fine-tuning the whole transformer does not fit a CPU's budget; one layer does. The token states that
enter that layer are computed once (the frozen layers below it), then each epoch runs only the copy of
that layer, the branch's pooling and standardisation, and the branch: the same arithmetic as the frozen
path at the start, every step a gradient through the layer. The copy is made by keeping the model's own
forward pass (its attention masks, whatever the transformers version) with its embeddings replaced by
the given states and its layers by the one copy. The states of every training text are held in memory:
about N x tokens x width floats (5,800 Rotten Tomatoes sentences: about 250 MB).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from branching.console import log
from branching.models.text import TEXT_POOLS, pool_tokens
from branching.studies.baselines import Outcome, SeedContext
from branching.studies.finetune_loop import fine_tune, trainable
from branching.train.nodes import branch_read, parent_normalizer
from branching.tree import cost


class _Given(nn.Module):
    """Stands for the embeddings: returns the token states it is given."""

    states: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return self.states


class OneLayer(nn.Module):
    """A trainable copy of one transformer layer (with the model's own mask handling), the branch's pooling
    over the attention mask, the parent's standardisation of that tap, and a trainable copy of the branch."""

    def __init__(self, encoder, layer: int, how: str, mean: np.ndarray, std: np.ndarray, branch: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(encoder.model)
        self.given = _Given()
        if not hasattr(self.model, "embeddings"):
            raise ValueError(f"{type(self.model).__name__} has no embeddings module to stand in for")
        self.model.embeddings = self.given
        layers = encoder._layer_list()  # the original's list: find the copy's by name
        name = next(n for n, m in encoder.model.named_modules() if m is layers)
        parent_name, _, attribute = name.rpartition(".")
        holder = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(holder, attribute, nn.ModuleList([copy.deepcopy(layers[layer])]))
        self.how = how
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, np.float32)))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, np.float32)))
        self.branch = copy.deepcopy(branch)
        self.model.requires_grad_(False)
        holder.get_submodule(attribute).requires_grad_(True)
        self.branch.requires_grad_(True)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.given.states = states
        out = self.model(input_ids=torch.zeros(mask.shape, dtype=torch.long, device=mask.device), attention_mask=mask)
        self.given.states = None
        pooled = pool_tokens(out.last_hidden_state, mask, self.how)
        return self.branch((pooled - self.mean) / self.std)


def entering_states(encoder, texts: list[str], layer: int) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(rows, token states entering `layer`, attention mask) per sorted batch of the texts."""
    ids, _ = encoder.tokenize(texts)
    out = []
    with torch.no_grad():  # not inference_mode: the states enter a layer that trains
        for rows in encoder.batches(ids):
            states, mask = encoder.forward([ids[r] for r in rows], layer + 1)
            out.append((np.asarray(rows), states[-1].float(), mask))
    return out


def run_finetune_text(ctx: SeedContext, spec) -> Outcome:
    """compare's "finetune" on a text parent (see the module's doc); the trained branch it starts from is
    ctx.models[spec.name], as for the other parents."""
    from branching.models.encoder import Encoder
    parent, branch = ctx.models["parent"], ctx.models[spec.name]
    _, tap, how, _ = branch_read(ctx.models, spec, ctx.recipes.default.branch)
    shape = parent.shape
    encoder = Encoder(shape["model"], shape["max_length"], ctx.device)
    normalizer = parent_normalizer(parent)
    columns = parent.net.columns(parent.net.index(tap, how))
    net = OneLayer(encoder, tap - 1, how, normalizer.mean[columns], normalizer.std[columns], branch.net).to(ctx.device)
    log(f"{spec.name}: fine-tuning layer{tap - 1} of {shape['model']} with the branch ({trainable(net):,} "
        f"parameters) on its training texts; the layers below run once")
    texts = ctx.data.raw_texts
    entering = lambda split, rows, generator: entering_states(encoder, [texts[split][i] for i in rows], tap - 1)  # noqa: E731
    flops = cost.linear_flops(branch.architecture)  # the transformer's own cost is not modelled (compare.md)
    return fine_tune(ctx, spec, net, entering, flops,
                     {"layer": f"layer{tap - 1}", "pool": how if how in TEXT_POOLS else None}, "texts")
