"""The training loop of compare's fine-tuning of one layer of a frozen network with the branch on it (a
transformer's layer, branching.studies.text_finetune; a CNN's block, branching.studies.block_finetune): the
states entering that layer are computed once and kept in batches, each (rows, *inputs of the network)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
