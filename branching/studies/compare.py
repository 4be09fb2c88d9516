"""`compare`: does a branch pay? Each branch against its baselines and ablations (branching.baselines),
on the same splits and seeds, summarised over seeds into OUT/compare.{json,md,png}.

Per branch the methods are (keys of METHODS): the branch as configured; the branch with the original
recipe; the parent's own head restricted to the branch's classes (no training); the parent's
unrestricted head (a prediction outside the branch's classes is wrong; accuracy only); a linear
probe on the branch's activations; the branch reading every other hidden layer of its source, pre
and post; an MLP with the widths of the branch's whole inference path trained from scratch on the
pixels of the branch's classes; and the trunk plus the branch fine-tuned end to end.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from branching.acceptance import selective
from branching.config.tree import NodeSpec, TreeConfig
from branching.console import log
from branching.data.tree_data import TreeData, load_tree_data
from branching.errors import ConfigError
from branching.fileio import staged_dir
from branching.models.device import CPU
from branching.models.forward import read
from branching.reports.compare import summarise, write_outputs
from branching.studies.baselines import (Outcome, Recipes, SeedContext, run_branch, run_branch_original, run_finetune,
                                         run_last_layer_probe, run_linear_probe, run_parent_head, run_parent_unrestricted,
                                         run_read, run_scratch, run_scratch_mlp, run_taps_concat)
from branching.studies.block_finetune import MAX_STATES_BYTES
from branching.studies.block_finetune import affordable as block_affordable
from branching.studies.block_finetune import run_finetune_block
from branching.studies.exit_compare import exits_seed, summarise_exits
from branching.studies.kshot import SKIPPED, kshot_seed, label, summarise_kshot
from branching.models.text import tap_names
from branching.studies.text_finetune import run_finetune_text
from branching.train.nodes import branch_read, parent_normalizer, train_parent

METHODS = {
    "branch": "branch, as configured",
    "branch_original": "branch, original recipe",
    "parent_head": "parent head on the branch's classes",
    "parent_unrestricted": "parent head, all classes",
    "linear_probe": "linear probe",
    "sentence_embedding": "linear probe on the sentence embedding",
    "last_layer_probe": "linear probe on the last layer",
    "taps_concat": "branch reading every tap, concatenated",
    "scratch_mlp": "MLP from scratch, same size",
    "scratch": "same network from scratch",
    "finetune": "trunk + branch fine-tuned",
}


def read_key(models, r: tuple) -> str:
    """The method key of the branch reading another tap: "layer1_post" (an MLP source), "stage1_avg", "layer3_mean"
    (an encoded parent's tap and pooling)."""
    source = models[r[0]]
    if source.net_kind.encoded:
        return f"{source.tap(r[1], r[2])['name']}_{r[2]}"
    return f"layer{r[1]}_{r[2]}" if len(source.net_kind.wheres) > 1 else f"{source.tap(r[1])['name']}_{r[3]}"


# compare's methods on the parent's trunk, by the names its kind lists (ParentKind.compare_methods): (key, method)
TRUNK_METHODS = {"scratch_mlp": ("scratch_mlp", run_scratch_mlp), "scratch": ("scratch", run_scratch),
                 "finetune": ("finetune", run_finetune), "finetune_layer": ("finetune", run_finetune_text),
                 "finetune_block": ("finetune", run_finetune_block)}


def method_label(key: str) -> str:
    if key in METHODS:
        return METHODS[key]
    tap, how = key.rsplit("_", 1)
    if tap.startswith("layer"):
        return f"branch reading layer {tap[len('layer'):]} {how}"
    return f"branch reading {tap} ({how})"


def method_plan(ctx: SeedContext, spec: NodeSpec) -> list[tuple[str, object]]:
    """(key, function) of every method for one branch, in report order."""
    configured = branch_read(ctx.models, spec, ctx.recipes.default.branch)
    source, parent = ctx.models[spec.source], ctx.models["parent"]
    encoded = source.net_kind.encoded  # its other layers, pooled as the branch pools (probe-layers tries every pooling)
    others = [read(ctx.models, spec.source, info["layer"], info["where"]) for info in source.feature_info
              if not encoded or info["where"] == configured[2]]
    taps = [(read_key(ctx.models, r), lambda c, s, r=r: run_read(c, s, r)) for r in others if r != configured]
    heads = [("parent_head", run_parent_head), ("parent_unrestricted", run_parent_unrestricted)]
    last = [(source.net_kind.last_probe, run_last_layer_probe)] if encoded and \
        source.shape["depth"] == len(source.net_kind.tap_widths(source.shape)) else []
    # an encoded parent's network is not trained from scratch; the layer or block the branch reads is fine-tuned
    # (text_finetune, block_finetune), where there is one below the tap
    trunk = [TRUNK_METHODS[name] for name in parent.net_kind.compare_methods if fits(name, ctx, spec, configured)]
    return [("branch", run_branch), ("branch_original", run_branch_original),
            *(heads if has_parent_head(ctx.config, spec) and parent.has_head else []),
            ("linear_probe", run_linear_probe), *last, *taps, ("taps_concat", run_taps_concat), *trunk]


def fits(method: str, ctx: SeedContext, spec: NodeSpec, configured: tuple) -> bool:
    """Whether a trunk method applies: fine-tuning one layer of an encoded parent needs a branch of the parent
    reading a layer past the first (and, for a block, feature maps that fit in memory)."""
    if not method.startswith("finetune_"):
        return True
    if spec.source != "parent" or configured[1] == 0:
        return False
    return method != "finetune_block" or block_affordable(ctx, spec)


def has_parent_head(config: TreeConfig, spec: NodeSpec) -> bool:
    """Whether the parent's head covers every class of the branch (not so for new classes)."""
    return set(spec.classes) <= set(config.parent.classes)


# ---- scoring and one seed -------------------------------------------------------------------

def score(outcome: Outcome, labels: np.ndarray) -> dict:
    """Test accuracy, and under the method's acceptance rule: coverage, accepted accuracy and AURC."""
    predicted = outcome.logits.argmax(axis=1)
    correct = predicted == labels
    result = {"test_accuracy": float(correct.mean()), "test_samples": int(len(labels)),
              "trainable_parameters": int(outcome.trainable_parameters),
              "inference_flops": int(outcome.inference_flops), "train_s": float(outcome.train_s),
              "parent_s": float(outcome.parent_s), "total_train_s": float(outcome.train_s + outcome.parent_s),
              "coverage": None, "accepted_accuracy": None, "aurc": None, "acceptance": None, **outcome.detail}
    if outcome.acceptance is not None:
        a = outcome.acceptance
        confidence = a.confidence(outcome.logits)
        accepted = a.accepts(confidence)
        right = int(correct[accepted].sum())
        result.update(coverage=float(accepted.mean()), accepted_accuracy=right / int(accepted.sum())
                      if accepted.any() else None, aurc=selective.aurc(confidence, correct),
                      acceptance={"temperature": a.temperature, "threshold": a.threshold})
    result["correct"] = correct  # per test image, for paired comparisons; not written to JSON
    return result


def make_context(config: TreeConfig, data: TreeData, seed: int, recipes: Recipes, progress: bool = True,
                 original_parent: bool = False, cache_dir=None, device: torch.device = CPU) -> SeedContext:
    """Train the seed's parent (and, if asked, an original-recipe parent) once, for every method."""
    start = time.perf_counter()
    parent, meta, _ = train_parent(config, data, recipes.default, seed, progress, device)
    parent.meta = meta
    parent_s = time.perf_counter() - start
    original_models, original_parent_s = {"parent": parent}, parent_s
    if original_parent:
        start = time.perf_counter()
        other, other_meta, _ = train_parent(config, data, recipes.original, seed, progress, device)
        other.meta = other_meta
        original_models, original_parent_s = {"parent": other}, time.perf_counter() - start
    return SeedContext(config, data, seed, recipes, progress, {"parent": parent}, original_models, parent_s,
                       original_parent_s, cache_dir=cache_dir, device=device)


def kshot_plan(ctx: SeedContext, spec: NodeSpec) -> list[tuple[str, object]]:
    """The methods of the k-shot curves: compare's, less kshot.SKIPPED, with the same network from scratch
    for every kind of parent (it validates on the held-out images as every other method does)."""
    encoded = ctx.models["parent"].net_kind.encoded  # its fine-tuning costs minutes a run: once, at k = all
    return [("scratch", run_scratch) if key == "scratch_mlp" else (key, fn) for key, fn in method_plan(ctx, spec)
            if key not in SKIPPED and not (encoded and key == "finetune")]


def compare_seed(config: TreeConfig, data: TreeData, seed: int, recipes: Recipes, progress: bool = True,
                 original_parent: bool = False, cache_dir=None, kshot: list | None = None,
                 device: torch.device = CPU) -> dict:
    """Train the parent(s) once, then every method for every branch; returns scored results.

    With cache_dir the branches on other layers read their activations (plain and flipped) from a
    features.FeatureCache there, computed once per layer instead of once per epoch: the same coin
    flips, several times faster, equal up to the rounding of the features.
    """
    ctx = make_context(config, data, seed, recipes, progress, original_parent, cache_dir, device)
    parent = ctx.models["parent"]
    parent_accuracy = None  # a parent without a head (a module's, a text parent's without classes) answers nothing
    if parent.has_head:
        images, parent_labels, _ = data.node_rows("test", config.parent)
        parent_accuracy = float((parent.predict(parent_normalizer(parent).transform(images)) == parent_labels).mean())
    result = {"seed": seed, "parent": {"train_s": ctx.parent_s, "original_train_s": ctx.original_parent_s,
                                       "test_accuracy": parent_accuracy}, "branches": {}}
    for spec in config.nodes()[1:]:
        _, labels, _ = data.node_rows("test", spec)
        scored = result["branches"][spec.name] = {}
        for key, run_method in method_plan(ctx, spec):
            outcome = run_method(ctx, spec)
            scored[key] = {**score(outcome, labels), "label": method_label(key)}
            log(f"seed {seed} {spec.name} {method_label(key)}: test accuracy "
                f"{100 * scored[key]['test_accuracy']:.1f}%, {outcome.train_s:.1f} s")
    if kshot:
        result["kshot"] = kshot_seed(ctx, kshot, result["branches"], kshot_plan, score)
    return result


# ---- the command ----------------------------------------------------------------------------

def text_method_notes(config: TreeConfig, f) -> list[str]:
    """compare.md's notes on the methods of a tree over a text parent."""
    shape = config.parent.shape_dict
    return [
        f"The parent is the pretrained transformer {shape['model']}, frozen: every text is encoded once (cut at "
        f"{shape['max_length']} tokens), and every method reads the same cached vectors, standardised on the "
        f"training texts. The parent's head is trained on its {tap_names(shape['layers'])[shape['head_layer']]} "
        f"({shape['head_pool']}).",
        "Every method uses the default recipe (no mirror images: the inputs are texts) and validates on the "
        "parent's held-out texts of the branch's classes.",
        "Linear probe: scikit-learn LogisticRegression on standardised vectors of the branch's tap, C chosen on "
        "validation log-loss. The sentence embedding: the same probe on the last layer, mean-pooled, which is "
        "what a sentence-transformers model outputs (before its L2 normalisation).",
        "Every tap, concatenated: the branch's own layers reading the embeddings and every layer at once, pooled "
        "as the branch pools, each value standardised on the training texts (Head2Toe's input without its "
        "feature selection).",
        f"Fine-tuning: the transformer layer whose output the branch reads and the trained branch, fine-tuned "
        f"together (AdamW lr {f.lr:g}, up to {f.epochs} epochs, patience {f.patience} on validation loss); the "
        f"layers below stay frozen and run once. Not run: the transformer trained from scratch, or fine-tuned "
        f"whole (a CPU cannot).",
        "Inference MFLOPs/image count the branch or probe only: the transformer's own cost, the same for every "
        "method, is not modelled (benchmarks/bench_text.py measures it in texts per second).",
    ]


def image_method_notes(config: TreeConfig, f) -> list[str]:
    """compare.md's notes on the methods of a tree over a pretrained image parent."""
    shape, kind = config.parent.shape_dict, config.parent.net_kind
    names = [name for name, _ in kind.tap_widths(shape)]
    return [
        f"The parent is the pretrained {shape['model']}, frozen, at {shape['input_size']} px: every image"
        + (" (and every training image mirrored)" if shape["mirrors"] else "") + " is encoded once, and every "
        "method reads the same cached vectors, standardised on the training images. "
        + (f"The parent's head is trained on its {names[shape['head_layer']]} ({shape['head_pool']})." if shape["head"]
           else "The parent has no head (no classes)."),
        "Every method uses the default recipe and validates on the parent's held-out images of the branch's classes; "
        + ("a mirror image is its cached encoding" if shape["mirrors"] else "no mirror images (mirrors = true would "
           "encode them)") + ", and no shifts (the inputs are vectors).",
        "Linear probe: scikit-learn LogisticRegression on standardised vectors of the branch's tap, C chosen on "
        "validation log-loss. The last layer: the same probe on the head's 1x1 convolution averaged over positions, "
        "the features the network's own ImageNet classifier reads.",
        "Every tap, concatenated: the branch's own layers reading the stem, every block and the head at once, pooled "
        "as the branch pools, each value standardised on the training images (Head2Toe's input without its feature "
        "selection).",
        f"Fine-tuning: the block whose output the branch reads and the trained branch, fine-tuned together (AdamW lr "
        f"{f.lr:g}, up to {f.epochs} epochs, patience {f.patience} on validation loss; batch norm frozen, no mirror "
        f"images); the blocks below stay frozen and run once. Left out for a branch of a branch, one on the stem, and "
        f"where the feature maps entering the block would pass {MAX_STATES_BYTES / 2**30:g} GiB. Not run: the "
        f"network trained from scratch, or fine-tuned whole (a CPU cannot).",
        "Inference MFLOPs/image count the trunk up to the tap read (torch's counter at the input size) and the branch "
        "or probe.",
    ]


def setup_notes(config: TreeConfig, recipes: Recipes, original_parent: bool) -> list[str]:
    """What the methods do differently from the original study, for compare.md."""
    kind = config.parent.net_kind
    mlp = "scratch_mlp" in (kind.compare_methods or ())
    o, f = recipes.original.branch, recipes.finetune
    notes = [f"'{METHODS['branch_original']}': the original's branch recipe (Adam lr {o.lr:g}, weight decay "
             f"{o.weight_decay:g}, batch {o.batch_size}, dropout {o.dropout:g}, up to {o.epochs} epochs, early "
             f"stopping with patience {o.patience} on an 80/20 split of its own training images, threshold "
             f"{o.threshold:g} without temperature scaling)"]
    if original_parent:
        notes[0] += ", on a parent trained with the original recipe (200 epochs, batch 64, no validation)."
    elif kind.encoded:
        notes[0] += f", on the same frozen {kind.name} parent."
    else:
        notes[0] += (", but on the default-recipe parent: the original parent recipe (200 epochs at batch 64, "
                     "about 9 minutes per seed on this machine) does not fit 3 seeds in 30 minutes. "
                     "Pass --original-parent to train it.")
    if any(spec.accept.score == "selfeval" for spec in config.nodes()):
        notes.append("A node that accepts by its self-evaluation branch is measured here by max softmax: `compare` "
                     "trains no judges (`branching selfeval` compares the scores).")
    if kind.encoded:
        return notes + (text_method_notes(config, f) if kind.reads == "texts" else image_method_notes(config, f))
    notes += [
        "Every other method uses the default recipe and validates on the parent's held-out images of the "
        "branch's classes (images the parent never trained on; for a class the parent never saw, a 15% of its "
        "training images that no node trains on)" + (", except the MLP from scratch, which holds "
        "out its own stratified 15% of its classes' training images." if mlp else "."),
        "Branches reading other layers train from activations computed once (plain and flipped, "
        "features.FeatureCache) instead of once per epoch as `run` does for the configured branch: the "
        "same coin flips and results up to rounding, but their training times are several times lower for "
        "that reason alone." if mlp else
        "Every branch trains from activations computed once (plain and flipped, features.FeatureCache), as "
        "`run` does on a CNN or ViT parent.",
        "Linear probe: scikit-learn LogisticRegression on standardised activations of the branch's layer, "
        "C chosen on validation log-loss; no flips.",
        "Every tap, concatenated: the branch's own layers reading every tap of its source at once (each hidden "
        "layer of an MLP where the branch reads its own, each stage or block of a CNN or ViT at its default "
        "pooling), every feature standardised on the training images: Head2Toe's multi-layer input without its "
        "feature selection; flips and validation as the branch.",
        f"Fine-tuning: the trained branch and a copy of the trunk below it (the parent itself is untouched), "
        f"AdamW lr {f.lr:g}, batch {f.batch_size}, up to {f.epochs} epochs, patience {f.patience}, flips and "
        f"label smoothing as the default branch recipe. The fine-tuned trunk no longer serves the parent's "
        f"other outputs.",
        "MLP from scratch: the widths of the branch's whole inference path (pixels, the source layers up "
        "to the one the branch reads, the branch's layers), so it has the same parameters and FLOPs as "
        "trunk plus branch; the default parent recipe, on the branch's classes only." if mlp else
        f"Same network from scratch: the parent's {config.parent.kind} up to the tap the branch reads, then "
        f"the branch's layers, with fresh weights (the same parameters and FLOPs as trunk plus branch), "
        f"trained end to end on the pixels of the branch's classes with the default {config.parent.kind} "
        f"recipe, validated as the fine-tuning.",
    ]
    return notes


def run_compare(config: TreeConfig, data_dir, out_dir, seeds: list[int], max_epochs: int | None = None,
                original_parent: bool = False, download: bool = False, progress: bool = True,
                command: str = "", kshot: list | None = None, device: torch.device = CPU) -> dict:
    """compare_seed for each seed (and for a tree with exits, exit_compare.exits_seed), then summaries and
    OUT/compare.{json,md,png}; returns the result."""
    branched = config.without_exits()  # the exits, and the branches below them, are compared as the cascade
    if not branched.branches and not config.exits():
        raise ConfigError(f"{config.path or '<config>'} has no branches: nothing to compare")
    if kshot and not branched.branches:
        raise ConfigError(f"{config.path or '<config>'}: --kshot trains the branches' methods, and this tree has "
                          f"none besides its exits and the branches below them; leave out --kshot")
    recipes = Recipes.capped(max_epochs)
    recipes.default.parent_for(config.parent.kind)  # recipes for this kind of parent, before any work
    if original_parent:
        recipes.original.parent_for(config.parent.kind)
    branched = branched.reading_every_tap()  # a text parent: its other layers are methods too
    with staged_dir(out_dir) as out:  # OUT is replaced whole at the end, or left as it was
        return _run_compare(branched, config if config.exits() else None, data_dir, out, seeds, recipes, max_epochs,
                            original_parent, download, progress, command, kshot, device)


def _run_compare(config, exited, data_dir, out, seeds, recipes, max_epochs, original_parent, download, progress,
                 command, kshot, device) -> dict:
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    data = (load_tree_data(config, data_dir, download=download, progress=progress, device=device) if config.branches
            else None)
    seed_results, exit_results = [], []
    with tempfile.TemporaryDirectory(prefix="compare-features-") as cache_dir:
        for seed in seeds:
            log(f"#### compare: seed {seed}")
            if config.branches:
                seed_results.append(compare_seed(config, data, seed, recipes, progress, original_parent, cache_dir,
                                                 kshot, device))
            if exited is not None:
                log(f"seed {seed}: the tree with its exits, as `run` trains it")
                exit_results.append(exits_seed(exited, data_dir, cache_dir, seed, recipes.default, download, progress,
                                               device))
    summary = summarise(seed_results) if seed_results else {"parent": None, "branches": {}}
    branches = {}
    for spec in config.nodes()[1:]:
        source = config.node(spec.source)
        branches[spec.name] = {"classes": list(spec.classes), "source": spec.source, "layer": spec.layer,
                               "where": source.net_kind.branch_where(spec.where, recipes.default.branch.where),
                               "test_samples": len(data.node_labels("test", spec)[1])}
        if spec.pool is not None:
            branches[spec.name]["pool"] = spec.pool
        if source.net_kind.encoded:
            branches[spec.name]["tap"] = source.taps(config.side)[spec.layer * len(source.net_kind.wheres)]["name"]
    setup = {"command": command, "config": config.path, "data": str(data_dir), "seeds": list(seeds),
             "parent_kind": config.parent.kind,
             "max_epochs": max_epochs, "original_parent": original_parent,
             "parent_classes": list(config.parent.classes), "branches": branches,
             "machine": f"{os.cpu_count()} CPU cores shared with other work, torch {torch.__version__} "
                        f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}), "
                        f"training on {device}"}
    if kshot:
        setup["kshot"] = [label(k) for k in kshot]
        labels = {name: {key: method_label(key) for key in rows} for name, rows in seed_results[0]["kshot"].items()}
        samples = {name: info["test_samples"] for name, info in branches.items()}
    notes = setup_notes(config, recipes, original_parent) if config.branches else []
    result = {"setup": setup, "notes": notes, "summary": summary,
              "timings": {"total_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start,
                          "load_average_start": load_start, "load_average_end": os.getloadavg()[0]}}
    if kshot:
        result["kshot"] = summarise_kshot(seed_results, kshot, samples, labels)
    if exit_results:
        result["exits"] = summarise_exits(exit_results)
    write_outputs(out, result)
    return result
