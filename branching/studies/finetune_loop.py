"""The training loop of compare's fine-tuning of one layer of a frozen network with the branch on it (a
transformer's layer, branching.studies.text_finetune; a CNN's block, branching.studies.block_finetune): the
states entering that layer are computed once and kept in batches, each (rows, *inputs of the network)."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from branching.studies.baselines import Outcome, SeedContext
from branching.studies.probe import held_out_split
from branching.train.nodes import fit_acceptance


def trainable(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def batch_logits(net: nn.Module, batches, n: int, classes: int) -> np.ndarray:
    """The network's logits of every row of the batches, in row order (eval mode, no gradients)."""
    logits = np.zeros((n, classes), np.float32)
    net.eval()
    with torch.no_grad():
        for rows, *inputs in batches:
            logits[rows] = net(*inputs).cpu().numpy()
    return logits


def train_layer(net: nn.Module, optimizer, train, val, y_train, y_val, r, generator, classes: int, device) -> int:
    """Epochs over the training batches (in an order drawn from `generator`), early stopping on validation
    loss with `r`'s patience, the best epoch's weights restored; returns the epochs run."""
    best, best_loss, waited, epochs = copy.deepcopy(net.state_dict()), np.inf, 0, 0
    for epoch in range(r.epochs):
        net.train()
        for b in generator.permutation(len(train)):
            batch_rows, *inputs = train[b]
            loss = F.cross_entropy(net(*inputs), y_train[batch_rows].to(device), label_smoothing=r.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epochs = epoch + 1
        val_loss = F.cross_entropy(torch.from_numpy(batch_logits(net, val, len(y_val), classes)),
                                   torch.from_numpy(y_val)).item()
        if val_loss < best_loss - 1e-6:
            best, best_loss, waited = copy.deepcopy(net.state_dict()), val_loss, 0
        else:
            waited += 1
            if r.patience is not None and waited >= r.patience:
                break
    net.load_state_dict(best)
    return epochs


def fine_tune(ctx: SeedContext, spec, net: nn.Module, entering, flops: int, detail: dict, noun: str = "images") -> Outcome:
    """compare's "finetune" of one layer and the branch (`net`, trainable where they are): the branch's training
    rows split as its validation is, the states entering the layer computed once (`entering(split, rows,
    generator)`: batches (positions, *inputs) of those rows of a split), AdamW with the fine-tuning recipe and early
    stopping, the acceptance fit on the validation rows, logits of the test rows. `entering` gets the training
generator for the training rows alone (None for the others), whose order it may draw from it. The seconds include the branch's
    own training, which it starts from."""
    start, r = time.perf_counter(), ctx.recipes.finetune
    labels, rows = ctx.data.node_labels("train", spec)
    train_idx, val_idx, kind = held_out_split(ctx.models["parent"], rows, labels)
    generator = np.random.default_rng(ctx.seed)
    train = entering("train", rows[train_idx], generator)
    val = entering("train", rows[val_idx], None)
    y_train, y_val = torch.from_numpy(labels[train_idx]), labels[val_idx]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=r.lr,
                                  weight_decay=r.weight_decay)
    with torch.random.fork_rng(devices=[]):  # dropout's draws from the seed, the global RNG untouched
        torch.manual_seed(ctx.seed)
        epochs = train_layer(net, optimizer, train, val, y_train, y_val, r, generator, len(spec.classes), ctx.device)
    acceptance = fit_acceptance(spec, r, batch_logits(net, val, len(val_idx), len(spec.classes)), y_val, noun,
                                notes=False)
    seconds = time.perf_counter() - start + ctx.branch_s[spec.name]
    _, test_rows = ctx.data.node_labels("test", spec)
    logits = batch_logits(net, entering("test", test_rows, None), len(test_rows), len(spec.classes))
    return Outcome(logits, acceptance, trainable(net), flops, seconds, ctx.parent_s,
                   {"epochs_run": epochs, "validation": kind, **detail})
