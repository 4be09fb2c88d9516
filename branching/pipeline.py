"""Train and evaluate a tree: the parent, then each branch on its source's hidden activations."""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

import torchly
from torchly import Model

from . import confidence, judge, scores, selfeval
from . import seeds as seeds_summary
from .acceptance import Acceptance, describe_rule, rejects
from .checkpoint import ModelStore
from .config import NodeSpec, TreeConfig
from .data import FINE_LABEL_NAMES, Split, load_label_names, load_split, resolve_classes, select
from .download import ensure_cifar100
from .errors import ConfigError, DataError
from .features import FeatureCache, branch_inputs
from .fileio import staged_dir, write_csv, write_json
from .forward import augment_transform, extract, node_inputs, read, read_tap
from .metrics import format_report
from .module_parent import load_weights
from .normalization import Normalizer
from .recipes import Recipe
from .routing import evaluate_tree, format_tree_report

ORIGINAL_BRANCH_SPLIT_SEED = 42  # the original's random_state for a branch's 80/20 split


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- data ------------------------------------------------------------------------------------

@dataclass
class TreeData:
    """The two splits of a CIFAR-100 folder and the official ids of the tree's classes."""

    data_dir: Path
    label_names: list[str]
    train: Split
    test: Split

    train_keep: np.ndarray | None = None  # training rows a k-shot comparison may use (None: all)

    def node_rows(self, split: str, spec: NodeSpec):
        """(uint8 images, labels as positions in spec.classes, row numbers in the split file)."""
        images, labels, rows = select(getattr(self, split), resolve_classes(spec.classes, self.label_names))
        if split == "train" and self.train_keep is not None:
            keep = self.train_keep[rows]
            return images[keep], labels[keep], rows[keep]
        return images, labels, rows

    def limited(self, keep: np.ndarray) -> "TreeData":
        """The same data with only the training rows where `keep` (a mask over the training split) is true."""
        return replace(self, train_keep=np.asarray(keep, dtype=bool))

    def class_rows(self, name: str) -> np.ndarray:
        """Row numbers of class `name` in the whole training split."""
        return select(self.train, resolve_classes([name], self.label_names))[2]

    _fingerprint: dict | None = field(default=None, repr=False, compare=False)

    def fingerprint(self) -> dict:
        """The folder and the sha256 of its three files, hashed once (every branch and cache entry asks)."""
        if self._fingerprint is None:
            digest = lambda name: hashlib.sha256((self.data_dir / name).read_bytes()).hexdigest()[:16]  # noqa: E731
            self._fingerprint = {"dir": str(self.data_dir), **{f"{n}_sha256": digest(n) for n in ("train", "test", "meta")}}
        return dict(self._fingerprint)


def load_tree_data(config: TreeConfig, data_dir, download: bool = False, progress: bool = True) -> TreeData:
    """Load (and, if asked, download) the data, checking that every class of the tree exists in it."""
    data_dir = Path(data_dir)
    for spec in (config.parent, *(b for b in config.branches.values() if b.new_classes)):
        try:  # before any download
            resolve_classes(spec.classes, list(FINE_LABEL_NAMES))
        except DataError as e:
            table = "[parent]" if spec.source is None else f"[branches.{spec.name}]"
            raise ConfigError(f"{config.path or '<config>'}: {table} classes: {e}") from None
    classes = config.classes()
    fine_ids = resolve_classes(classes, list(FINE_LABEL_NAMES))
    if download:
        ensure_cifar100(data_dir, progress=progress)
    elif not all((data_dir / n).is_file() for n in ("train", "test", "meta")):
        raise DataError(f"no CIFAR-100 files (train, test, meta) in {data_dir}; put the official cifar-100-python "
                        f"files there, or run a training command without --no-download to fetch them")
    data = TreeData(data_dir, load_label_names(data_dir), load_split(data_dir, "train"), load_split(data_dir, "test"))
    for split in ("train", "test"):
        present = set(np.unique(getattr(data, split).fine_labels).tolist())
        missing = [name for name, i in zip(classes, fine_ids) if i not in present]
        if missing:
            raise DataError(f"{data_dir / split} has no images of {', '.join(map(repr, missing))}, classes of the tree "
                            f"in {config.path or '<config>'}; pass --config with a tree of the data's classes (the "
                            f"default is the original study's fish and flower tree)")
    return data


def _split(n_or_labels, test_size, seed):
    labels = np.asarray(n_or_labels)
    return train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed)


# ---- training --------------------------------------------------------------------------------

def fit_kwargs(r, seed, progress, desc) -> dict:
    return dict(epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, weight_decay=r.weight_decay,
                optimizer=r.optimizer, label_smoothing=r.label_smoothing, lr_schedule=r.lr_schedule,
                early_stopping_patience=r.patience, seed=seed, progress=progress, desc=desc)


def new_class_hold_out(config: TreeConfig, data: TreeData, seed: int, fraction: float) -> np.ndarray:
    """Training rows that no node trains on, of the classes the parent never sees: per class, a `fraction`
    drawn with the seed and the class (so every branch learning a class holds out the same images).
    The branches that learn those classes validate on them."""
    held = [np.zeros(0, dtype=np.int64)]
    for name in config.classes():
        if name in config.parent.classes or not fraction:
            continue
        rows = data.class_rows(name)
        rng = np.random.default_rng([seed, data.label_names.index(name)])
        held.append(rng.choice(rows, size=int(round(fraction * len(rows))), replace=False))
    return np.sort(np.concatenate(held))


def held_out_rows(parent: Model) -> np.ndarray:
    """Training rows no node trains on: the parent's validation images and the new classes' hold-out."""
    return np.concatenate([np.asarray(parent.meta.get("val_rows", []), dtype=np.int64),
                           np.asarray(parent.meta.get("new_class_val_rows", []), dtype=np.int64)])


def train_parent(config: TreeConfig, data: TreeData, recipe: Recipe, seed: int, progress: bool = True):
    """Train the parent (a module parent is loaded instead); returns (model, checkpoint meta, normaliser)."""
    spec, r = config.parent, recipe.parent_for(config.parent.kind)
    if spec.kind == "module":
        return load_module_parent(config, data, recipe, seed)
    images, labels, rows = data.node_rows("train", spec)
    if r.validation:
        train_idx, val_idx = _split(labels, r.validation, seed)
    else:
        train_idx, val_idx = np.arange(len(labels)), np.arange(0)
    # the MLP standardises every pixel (the original recipe), the CNN and the ViT every colour channel
    normalizer = Normalizer.fit(images[train_idx], per_channel=spec.kind != "mlp")
    X = normalizer.transform(images)
    dropout = spec.dropout if spec.dropout is not None else r.dropout
    if spec.kind == "mlp":
        model = Model([X.shape[1], *spec.hidden, len(spec.classes)], activation=spec.activation, dropout=dropout,
                      seed=seed)
    else:
        model = Model([X.shape[1], len(spec.classes)], dropout=dropout, seed=seed, kind=spec.kind, shape=spec.shape_dict)
    transform = augment_transform(normalizer, r.flip, r.crop) if r.flip or r.crop else None
    validation = (X[val_idx], labels[val_idx]) if len(val_idx) else None
    log(f"parent ({spec.kind}, {model.num_parameters:,} parameters): {len(train_idx)} training images, "
        f"{len(val_idx)} validation, {len(spec.classes)} classes, recipe {recipe.name}")
    history = model.fit(X[train_idx], labels[train_idx], validation_data=validation, train_transform=transform,
                        restore_best_weights=validation is not None, **fit_kwargs(r, seed, progress, "parent"))
    model.freeze()
    acceptance = fit_acceptance(spec, r, model.logits(X[val_idx]), labels[val_idx])
    meta = {"kind": "parent", "name": "parent", "classes": list(spec.classes), "hidden": list(spec.hidden),
            "normalization": normalizer.to_dict(), "recipe": recipe.to_dict(spec.kind), "seed": seed,
            "train_rows": torch.from_numpy(rows[train_idx]), "val_rows": torch.from_numpy(rows[val_idx]),
            "history": history, "acceptance": acceptance.to_dict(), "tree": config.to_dict()}
    held = new_class_hold_out(config, data, seed, r.validation)
    if len(held):
        meta["new_class_val_rows"] = torch.from_numpy(held)
    return model, meta, normalizer


def load_module_parent(config: TreeConfig, data: TreeData, recipe: Recipe, seed: int):
    """A module parent (kind "module"): built, loaded from its weights file and frozen, never trained. Like a
    trained parent it holds out a stratified share of the training images per seed (recipe validation), on
    which its branches validate and its head, if used, is calibrated. Normalised by the config's mean and std
    (0..1 scale) or else by the per-channel statistics of the other training images."""
    start = time.perf_counter()
    spec, r = config.parent, recipe.parent_for("module")
    shape = spec.shape_dict
    images, labels, rows = data.node_rows("train", spec)
    train_idx, val_idx = _split(labels, r.validation, seed)
    if "mean" in shape:
        normalizer = Normalizer.of_channels(255 * np.array(shape["mean"]), 255 * np.array(shape["std"]))
    else:
        normalizer = Normalizer.fit(images[train_idx], per_channel=True)
    model = Model([images.shape[1], len(spec.classes)], seed=seed, kind="module", shape=shape)
    try:
        load_weights(model.net, shape["weights"])
    except ValueError as e:
        raise ConfigError(f"{config.path or '<config>'}: [parent] weights: {e}") from None
    model.freeze()
    log(f"parent (module {shape['module']}, {sum(p.numel() for p in model.net.parameters()):,} parameters, frozen, "
        f"{'its head used' if model.has_head else 'no head'}): {len(train_idx)} training images, {len(val_idx)} "
        f"held out for validation, {len(spec.classes)} classes")
    acceptance = None
    if model.has_head:
        X_val = normalizer.transform(images[val_idx])
        acceptance = fit_acceptance(spec, r, model.logits(X_val), labels[val_idx]).to_dict()
    meta = {"kind": "parent", "name": "parent", "classes": list(spec.classes), "hidden": [],
            "normalization": normalizer.to_dict(), "recipe": recipe.to_dict("module"), "seed": seed,
            "train_rows": torch.from_numpy(rows[train_idx]), "val_rows": torch.from_numpy(rows[val_idx]),
            "history": {"epochs_run": 0, "best_epoch": 0, "stopped_early": False,
                        "seconds": time.perf_counter() - start}, "acceptance": acceptance,
            "module": shape["module"], "weights": shape["weights"], "weights_sha256": shape["weights_sha256"],
            "tree": config.to_dict()}
    held = new_class_hold_out(config, data, seed, r.validation)
    if len(held):
        meta["new_class_val_rows"] = torch.from_numpy(held)
    return model, meta, normalizer


def parent_normalizer(parent: Model) -> Normalizer:
    return Normalizer.from_dict(parent.meta["normalization"])


def train_branch(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData, recipe: Recipe,
                 seed: int, progress: bool = True, cache_dir=None):
    """Train branch `name` on its source's activations; returns (model, checkpoint meta). With cache_dir
    the activations come from a features.FeatureCache there (built on first use)."""
    spec, r = config.node(name), recipe.branch
    parent = models["parent"]
    normalizer = parent_normalizer(parent)
    images, labels, rows = data.node_rows("train", spec)
    X = normalizer.transform(images)
    validation = r.validation
    parent_val = set(held_out_rows(parent).tolist())
    if validation == "parent" and not parent_val:
        log(f"{name}: the parent holds out no images (trained with the original recipe); "
            f"validating on an 80/20 split of the branch's training images instead")
        validation = "own"
    if validation == "parent":
        in_val = np.array([row in parent_val for row in rows.tolist()], dtype=bool)
        train_idx, val_idx = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    else:
        train_idx, val_idx = _split(labels, 0.2, ORIGINAL_BRANCH_SPLIT_SEED)
    source = models[spec.source]
    tap = branch_read(models, spec, r)
    where = tap[2]
    if cache_dir is None and parent.kind != "mlp":  # a trunk costlier than the branch: its features once
        with tempfile.TemporaryDirectory(prefix="branch-features-") as scratch:
            return train_branch(config, name, models, data, recipe, seed, progress, scratch)
    if cache_dir is not None:  # features (and their mirror images) computed once, kept on disk
        train_X, transform, features_val = branch_inputs(
            FeatureCache(cache_dir, log), models, data.fingerprint(), tap, X, rows, train_idx, val_idx, r.flip)
    else:
        features_val = extract(models, [tap], X[val_idx])[0]
        if r.flip:
            flip = augment_transform(normalizer)

            def transform(xb, g):
                with torch.no_grad():
                    return read_tap(models, tap, flip(xb, g))
            train_X = X[train_idx]
        else:
            transform, train_X = None, extract(models, [tap], X[train_idx])[0]
    width = source.width(*tap[1:])
    dropout = spec.dropout if spec.dropout is not None else r.dropout
    model = Model([width, *spec.hidden, len(spec.classes)], activation=spec.activation, dropout=dropout, seed=seed)
    log(f"{name}: reads {spec.source} {source.tap(*tap[1:3])['name']} (pool {tap[3]}, width {width}); "
        f"{len(train_idx)} training images, {len(val_idx)} validation ({validation}), recipe {recipe.name}")
    history = model.fit(train_X, labels[train_idx], validation_data=(features_val, labels[val_idx]),
                        train_transform=transform, restore_best_weights=True,
                        **fit_kwargs(r, seed, progress, name))
    model.freeze()
    acceptance = fit_acceptance(spec, r, model.logits(features_val), labels[val_idx])
    meta = {"kind": "branch", "name": name, "classes": list(spec.classes), "hidden": list(spec.hidden),
            "source": spec.source, "layer": spec.layer, "where": where, "pool": tap[3],
            "tap": source.tap(*tap[1:3])["name"],
            "source_fingerprint": source.fingerprint(), "parent_fingerprint": parent.fingerprint(),
            "recipe": recipe.to_dict(parent.kind), "seed": seed, "validation": validation,
            "train_rows": torch.from_numpy(rows[train_idx]), "val_rows": torch.from_numpy(rows[val_idx]),
            "acceptance": acceptance.to_dict(), "history": history, "tree": config.to_dict()}
    return model, meta


def branch_read(models: dict[str, Model], spec: NodeSpec, r) -> tuple:
    """What branch `spec` reads, trained with recipe node r: (source, layer, where, pool); an MLP source's
    layer is read before or after its activation (`where`, else the recipe's)."""
    where = (spec.where or r.where) if models[spec.source].kind == "mlp" else None
    return read(models, spec.source, spec.layer, where, spec.pool)


def fit_acceptance(spec: NodeSpec, r, val_logits: np.ndarray, val_labels: np.ndarray) -> Acceptance:
    """A node's temperature and, if it has a reject option, its rule's threshold, chosen on validation
    data only. A rule that cannot be met accepts nothing and says why."""
    accept = spec.accept
    if accept.score == "selfeval":  # until its judge is trained (selfeval.attach_judge fits it again)
        accept = replace(accept, score="msp")
    acceptance = Acceptance.fit(accept, r, val_logits, val_labels, rejects=rejects(spec))
    if not acceptance.attained:
        log(f"{spec.name}: acceptance rule {acceptance.rule!r} cannot be met: {acceptance.reason}; accepting nothing")
    return acceptance


# ---- evaluation ------------------------------------------------------------------------------

def evaluate_node(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData):
    """Test metrics of one node and its per-image predictions (as rows for the CSV); a branch is also
    compared with the parent's own head restricted to the branch's classes."""
    spec, model = config.node(name), models[name]
    images, labels, rows = data.node_rows("test", spec)
    X = parent_normalizer(models["parent"]).transform(images)
    logits = model.logits(node_inputs(models, name, X))
    head = None
    if spec.source is not None and models["parent"].has_head and set(spec.classes) <= set(config.parent.classes):
        parent = models["parent"]
        head = scores.parent_head(parent.logits(X), config.parent.classes, spec.classes,
                                  Acceptance.of(parent.meta).temperature)
    judged = judge.load_for(models, name)
    if judged is None and spec.selfeval is not None and "path" in model.meta:  # trained by run, shown beside MSP
        judged = judge.load(Path(model.meta["path"]).parent, name, model)
    probability = None if judged is None else judged.score_images(models, X, logits)
    acceptance = Acceptance.of(model.meta)
    metrics, columns = scores.score_node(spec.classes, labels, logits, acceptance, head, probability)
    metrics["confidence_scores"] = confidence.every_score(logits, logits.argmax(axis=1) == labels,
                                                          acceptance.temperature, probability)
    return metrics, scores.prediction_rows(rows, spec.classes, columns)


# ---- the whole tree --------------------------------------------------------------------------

def _history_summary(history: dict) -> dict:
    return {k: history[k] for k in ("epochs_run", "best_epoch", "stopped_early")}


def run(config: TreeConfig, data_dir, out_dir, recipe: Recipe, seed: int = 0, download: bool = False,
        progress: bool = True, echo=print, report: bool = True, cache_dir=None) -> dict:
    """Train the parent and every branch, evaluate all on the test split, write OUT/metrics.json,
    OUT/predictions/<node>.csv, OUT/models/<node>.pt and (with report) OUT/report.md, OUT/report.html and
    OUT/plots/; returns the metrics. OUT is replaced whole at the end (fileio.staged_dir): an error or an
    interrupt leaves it as it was."""
    recipe.parent_for(config.parent.kind)  # a recipe for this kind of parent, before any work
    if cache_dir is not None and Path(out_dir).resolve() in (Path(cache_dir).resolve(), *Path(cache_dir).resolve().parents):
        raise ConfigError(f"--cache {cache_dir} is inside --out {out_dir}, which a run replaces whole; keep the "
                          f"cache elsewhere")
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ConfigError(f"--cache {cache_dir} is a file; give a folder for the activation cache")
    with staged_dir(out_dir) as out:
        return _run(config, data_dir, out, recipe, seed, download, progress, echo, report, cache_dir)


def _run(config, data_dir, out: Path, recipe, seed, download, progress, echo, report, cache_dir) -> dict:
    start = time.perf_counter()
    data = load_tree_data(config, data_dir, download=download, progress=progress)
    store = ModelStore(out / "models")
    timings: dict[str, float] = {}
    models: dict[str, Model] = {}
    for spec in config.nodes():
        t = time.perf_counter()
        if spec.source is None:
            model, meta, _ = train_parent(config, data, recipe, seed, progress)
        else:
            model, meta = train_branch(config, spec.name, models, data, recipe, seed, progress, cache_dir)
        store.save(spec.name, model, meta)
        models[spec.name] = store.load(spec.name)
        if spec.selfeval is not None:
            meta = selfeval.attach_judge(config, spec.name, models, data, recipe, seed, store.directory, progress, log)
            store.save(spec.name, model, meta)
            models[spec.name] = store.load(spec.name)
        timings[f"train_{spec.name}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = {"seed": seed, "recipe": recipe.name, "config": config.to_dict(), "data": data.fingerprint(),
               "device": str(torchly.DEVICE), "parent": None, "branches": {}}
    for spec in config.nodes():
        if not models[spec.name].has_head:  # a module parent without head = true: no class logits
            echo("parent: a module without a head; it has no test accuracy (its branches are evaluated alone)")
            continue
        node_metrics, predictions = evaluate_node(config, spec.name, models, data)
        node_metrics.update(train_samples=len(models[spec.name].meta["train_rows"]),
                            val_samples=len(models[spec.name].meta["val_rows"]),
                            **_history_summary(models[spec.name].meta["history"]))
        write_csv(out / "predictions" / f"{spec.name}.csv", predictions, scores.PREDICTION_COLUMNS)
        if spec.source is None:
            metrics["parent"] = node_metrics
        else:
            metrics["branches"][spec.name] = node_metrics
        echo(format_report(spec.name, node_metrics, spec.classes))
    if models["parent"].has_head:
        metrics["tree"], tree_rows = evaluate_tree(config, models, data)
        write_csv(out / "tree.csv", tree_rows, scores.PREDICTION_COLUMNS)
        echo(format_tree_report(metrics["tree"], config.parent.classes))
    else:
        metrics["tree"] = None
        echo("routed tree: not evaluated (the parent has no head to route by; predict --branch or --node NAME)")
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    metrics["timings"] = timings
    write_json(out / "metrics.json", metrics)
    if report:
        from .report import write_report  # matplotlib is only loaded when a report is written
        write_report(out)
    return metrics


def run_seeds(config: TreeConfig, data_dir, out_dir, recipe: Recipe, seeds: list[int], download: bool = False,
              progress: bool = True, echo=print, report: bool = True) -> dict:
    """run for each seed into OUT/seed-<n>/, then OUT/metrics.json with the mean and std of every headline
    figure (branching.seeds); returns that summary."""
    recipe.parent_for(config.parent.kind)
    with staged_dir(out_dir) as out:
        return _run_seeds(config, data_dir, out, recipe, seeds, download, progress, echo, report)


def _run_seeds(config, data_dir, out: Path, recipe, seeds, download, progress, echo, report) -> dict:
    start = time.perf_counter()
    runs = {}
    for seed in seeds:
        echo(f"#### seed {seed} -> {out / f'seed-{seed}'}")
        runs[seed] = run(config, data_dir, out / f"seed-{seed}", recipe, seed=seed, download=download,
                         progress=progress, echo=echo, report=report)
    first = runs[seeds[0]]
    summary = seeds_summary.summarise(runs)
    metrics = {"seeds": seeds, "recipe": recipe.name, "config": first["config"], "data": first["data"],
               "std": "sample standard deviation over seeds (ddof 1)",
               "runs": {str(s): f"seed-{s}/metrics.json" for s in seeds},
               "rules": {n: describe_rule(m["acceptance"]) for n, m in [("parent", first["parent"]),
                                                                         *first["branches"].items()]
                         if m and "acceptance" in m},
               "parent": summary["parent"], "branches": summary["branches"], "tree": summary["tree"],
               "timings": {**summary["timings"], "all_seeds_s": time.perf_counter() - start}}
    write_json(out / "metrics.json", metrics)
    echo(seeds_summary.format_summary(metrics))
    if report:
        from .report import write_seeds_report  # matplotlib is only loaded when a report is written
        write_seeds_report(out)
    return metrics
