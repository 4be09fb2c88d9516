"""Training a Model: mini-batch cross-entropy with validation, early stopping and the best epoch's
weights restored. A mixin of branching.models.model.Model, on the device the caller names."""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from branching import distributed
from branching.models.batches import Augment, DeviceInputs
from branching.models.checks import as_2d_float, as_labels, check_choice, check_int, check_real
from branching.models.device import autocast, compiled, resolve_device

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = (None, "cosine", "onecycle")
MONITORS = ("val_loss", "val_accuracy")


class Trainable:
    """fit() for a Model (self.net, self.architecture, self.net_kind, self._loss_accuracy, self._device)."""

    def fit(self, X, y, validation_data=None, epochs=10, batch_size=64, lr=1e-3, weight_decay=0.0,
            optimizer="adam", label_smoothing=0.0, early_stopping_patience=None, monitor="val_loss",
            restore_best_weights=True, lr_schedule=None, train_transform=None, seed=None,
            progress=True, desc="train", device="cpu", compile=False) -> dict:
        """Mini-batch training on cross-entropy on `device` (the model returns to the CPU at the end);
        returns the history (also kept as .history).

        The inputs go to the device once (batches.DeviceInputs). `train_transform`: a batches.Augment, applied
        there with the training generator's draws, or any function (batch, generator) -> batch of the network's
        inputs, given each normalised batch on the device. `compile`: the training step's network through
        torch.compile. Under torchrun (branching.distributed) every rank must call fit alike: it trains under
        DistributedDataParallel."""
        if self.net_kind.trunk == "frozen":
            raise ValueError(f"a {self.kind} parent is never trained here: it is loaded from its weights file")
        n_in, n_out = self.architecture[0], self.architecture[-1]
        X = as_2d_float(X, None if train_transform is not None else n_in)
        if len(X) == 0:
            raise ValueError("cannot fit on an empty dataset")
        y = as_labels(y, len(X), n_out, "y")
        val = None
        if validation_data is not None:
            if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            X_val = as_2d_float(validation_data[0], n_in)
            val = (X_val, as_labels(validation_data[1], len(X_val), n_out, "y_val"))
        epochs = check_int(epochs, "epochs", minimum=1)
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        patience = None if early_stopping_patience is None else check_int(
            early_stopping_patience, "early_stopping_patience", minimum=0)
        check_choice(optimizer, OPTIMIZERS, "optimizer")
        check_choice(lr_schedule, LR_SCHEDULES, "lr_schedule")
        check_choice(monitor, MONITORS, "monitor")
        lr = check_real(lr, "lr", lambda v: 0 < v < math.inf, "a positive number")
        weight_decay = check_real(weight_decay, "weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0")
        label_smoothing = check_real(label_smoothing, "label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)")
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model is frozen: it has no trainable parameters")
        device = resolve_device(device)
        self.net.to(device)  # the parameters move in place; back to the CPU when fit ends

        if seed is not None:
            torch.manual_seed(check_int(seed, "seed", minimum=0))  # dropout uses the global RNG
        share = (distributed.rank(), distributed.world()) if distributed.sharding() else (0, 1)
        batches_seed = distributed.broadcast(int(torch.randint(0, 2**62, ()).item()))  # rank 0's: one permutation
        generator = torch.Generator().manual_seed(batches_seed)
        if share[1] > 1:  # each rank its own dropout masks
            torch.manual_seed(batches_seed + share[0])
        opt = make_optimizer(optimizer, params, lr, weight_decay)
        scheduler = make_scheduler(lr_schedule, opt, lr, epochs * steps_per_epoch(len(X), batch_size, share[1]))
        step_net = compiled(self.net, device) if compile else self.net  # compiled first: inside DDP it would not be
        if share[1] > 1:  # gradients averaged over the ranks; the parameters start as rank 0's
            step_net = DistributedDataParallel(step_net, device_ids=[device.index] if device.type == "cuda" else None)
        inputs = DeviceInputs(X, device)
        yt = torch.from_numpy(y).to(inputs.index_device)

        history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "lr": []}
        sign = 1.0 if monitor == "val_loss" else -1.0  # compare as "smaller is better"
        best, best_epoch, best_state, wait, stopped_early = math.inf, 0, None, 0, False
        start = time.perf_counter()
        bar = tqdm(range(1, epochs + 1), desc=desc, disable=not progress, file=sys.stderr, unit="epoch")
        try:
            for epoch in bar:
                loss, accuracy = self._train_epoch(step_net, inputs, yt, opt, scheduler, batch_size,
                                                   label_smoothing, train_transform, generator, share)
                distributed.broadcast_buffers(self.net)  # batch norm's statistics: rank 0's on every rank
                history["loss"].append(loss)
                history["accuracy"].append(accuracy)
                history["lr"].append(float(opt.param_groups[0]["lr"]))
                postfix = {"loss": f"{loss:.4f}"}
                if val is not None:
                    metrics = self._loss_accuracy(*val)
                    history["val_loss"].append(metrics["loss"])
                    history["val_accuracy"].append(metrics["accuracy"])
                    postfix.update(val_loss=f"{metrics['loss']:.4f}", val_acc=f"{metrics['accuracy']:.4f}")
                    current = sign * metrics["loss" if monitor == "val_loss" else "accuracy"]
                    if current < best:
                        best, best_epoch, wait = current, epoch, 0
                        if restore_best_weights:
                            best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                    else:
                        wait += 1
                        stopped_early = patience is not None and wait >= patience
                bar.set_postfix(postfix)
                if stopped_early:
                    break
        finally:
            bar.close()
            self.net.eval()
            self.net.to("cpu")
        if best_state is not None:
            self.net.load_state_dict(best_state)
        epochs_run = len(history["loss"])
        history.update(epochs_run=epochs_run, best_epoch=best_epoch if val is not None else epochs_run,
                       stopped_early=stopped_early, seconds=time.perf_counter() - start)
        self.history = history
        return history

    def _train_epoch(self, net, inputs, yt, opt, scheduler, batch_size, label_smoothing, transform, generator,
                     share=(0, 1)):
        """One pass in train mode over slices of a random permutation; returns the epoch's mean training loss
        and accuracy (summed on the device, read once).

        share (rank, world): under DistributedDataParallel every rank draws the same permutation, padded to a
        multiple of the world size by repeating it (as torch's DistributedSampler), and cuts it into steps of
        world x ceil(batch_size / world) rows, of which each rank takes its contiguous part; augmentation
        draws are made for the whole step and each rank takes its part (with a batch size that divides by the
        world size, every image is augmented as in one process; one process is the plain loop)."""
        self.net.train()
        device = inputs.device
        rank, world = share
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, right answers, rows
        order = torch.randperm(len(inputs), generator=generator).to(inputs.index_device)
        for idx in rank_steps(order, batch_size, rank, world):
            if isinstance(transform, Augment):
                xb = transform.batch(inputs, idx, generator, share)
            else:
                xb = inputs.rows(idx)
                if transform is not None:
                    xb = transform(xb, generator)
            if not isinstance(xb, torch.Tensor) or tuple(xb.shape) != (len(idx), self.architecture[0]):
                got = tuple(xb.shape) if isinstance(xb, torch.Tensor) else type(xb).__name__
                raise ValueError(f"train_transform must return a tensor of shape "
                                 f"({len(idx)}, {self.architecture[0]}); got {got}")
            xb, yb = xb.to(device, torch.float32), yt[idx].to(device, non_blocking=True)
            with autocast(device):
                out = net(xb)
                loss = F.cross_entropy(out.float(), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            sums[0] += loss.detach() * len(idx)
            sums[1] += (out.argmax(dim=1) == yb).sum()
            sums[2] += len(idx)
        loss_sum, correct, rows = distributed.all_sum(sums).tolist()
        return loss_sum / rows, correct / rows


def rank_steps(order: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1):
    """The rows `rank` trains on at each step of an epoch in `order` (see _train_epoch): order split into
    batches for one process; for several, the order padded to a multiple of the world size by repeating it,
    cut into steps of world x ceil(batch_size / world) rows, and this rank's contiguous part of each."""
    if world == 1:
        yield from order.split(batch_size)
        return
    total = math.ceil(len(order) / world) * world
    order = order.repeat(math.ceil(total / len(order)))[:total]
    for chunk in order.split(math.ceil(batch_size / world) * world):
        part = len(chunk) // world
        yield chunk[rank * part:(rank + 1) * part]


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps in an epoch of n rows (see _train_epoch for world > 1)."""
    return math.ceil(math.ceil(n / world) / math.ceil(batch_size / world))


def make_optimizer(name, params, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def make_scheduler(name, opt, lr, total_steps):
    """Per-step schedules over the whole run."""
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    return None
