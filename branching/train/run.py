"""A whole run: train the parent, then each branch on its source's activations, evaluate every node and
the routed tree on the test split, and write OUT (metrics, predictions, models, report)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from branching.acceptance import confidence, scores
from branching.acceptance.metrics import format_report
from branching.acceptance.rule import Acceptance, describe_rule
from branching.config.recipes import Recipe
from branching.config.tree import TreeConfig
from branching.console import busy_note, cpu_seconds, log
from branching.data.tree_data import TreeData, data_notes, load_tree_data
from branching.errors import ConfigError
from branching import distributed
from branching.fileio import staged_dir, write_bytes, write_csv, write_json
from branching.models.device import CPU, check_compile, on_device
from branching.models.forward import node_inputs
from branching.models.model import Model
from branching.reports import seeds as seeds_summary
from branching.train import exits, selfeval
from branching.train.nodes import parent_normalizer, train_branch, train_parent
from branching.tree import judge
from branching.tree.checkpoint import ModelStore
from branching.tree.evaluation import evaluate_tree, format_tree_report


def epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def plan(config: TreeConfig, recipe: Recipe, seed: int, device) -> str:
    """What a run will train, said before it starts: every node, its epochs, the device."""
    parent, r = config.parent, recipe.parent_for(config.parent.kind).on(device)
    stop = lambda node: "" if node.patience is None else f", early stopping after {node.patience} without gain"  # noqa: E731
    processes = f" x {distributed.world()} processes (torchrun)" if distributed.launched() else ""
    lines = [f"training {len(config.nodes())} nodes on {device}{processes} (seed {seed}, recipe {recipe.name}):"]
    kind, shape = parent.net_kind, parent.shape_dict
    if kind.trunk == "frozen":
        lines.append(f"  parent: {kind.describe(shape)}, loaded and frozen (never trained)")
    elif kind.encoded:
        lines.append(f"  parent: {kind.describe(shape)}, frozen; "
                     + (f"its head on {len(parent.classes)} classes, up to {epochs(r.epochs)}{stop(r)}" if shape["head"]
                        else "no head (no classes)"))
    else:
        lines.append(f"  parent: a {parent.kind} on {len(parent.classes)} classes, up to {epochs(r.epochs)}{stop(r)}")
    for spec in config.nodes()[1:]:
        at = (f"{parent.taps(config.side)[len(kind.wheres) * spec.layer]['name']} ({spec.pool})"
              if spec.source == "parent" and kind.encoded else f"layer {spec.layer}")
        lines.append(f"  {spec.name}: {len(spec.classes)} classes, reading {spec.source} at {at}, up to "
                     f"{epochs(recipe.branch.epochs)}{stop(recipe.branch)}")
    if config.exits():
        lines.append(f"  then the exits' cascade ({', '.join(e.name for e in config.exits())}), fitted on held-out "
                     f"calibration inputs for {config.cascade.to_dict()}")
    for spec in config.nodes():
        if spec.selfeval is not None:
            lines.append(f"  {spec.name}'s self-evaluation judge: {spec.selfeval.folds} cross-fitted copies of the node, "
                         f"then the judge")
    return "\n".join(lines)


def _train_node(config, spec, models, data, recipe, seed, progress, cache_dir, device, compile, store) -> float:
    """Train node `spec` (and its self-evaluation judge), save it in `store` and load it into `models`; returns
    the seconds it took."""
    t = time.perf_counter()
    if spec.source is None:
        model, meta, _ = train_parent(config, data, recipe, seed, progress, device, compile)
    else:
        model, meta = train_branch(config, spec.name, models, data, recipe, seed, progress, cache_dir, device)
    store.save(spec.name, model, meta)
    models[spec.name] = store.load(spec.name)
    if spec.selfeval is not None:
        meta = selfeval.attach_judge(config, spec.name, models, data, recipe, seed, store.directory, progress, log,
                                     device)
        store.save(spec.name, model, meta)
        models[spec.name] = store.load(spec.name)
    return time.perf_counter() - t


def _levels(config: TreeConfig) -> list[list]:
    """The nodes by depth: the parent, then its branches, then theirs; each level's nodes are independent."""
    levels: list[list] = []
    for spec in config.nodes():
        depth = config.depth(spec.name)
        levels += [[] for _ in range(depth + 1 - len(levels))]
        levels[depth].append(spec)
    return levels


def _node_files(store: ModelStore, name: str, timings: dict) -> dict:
    """A trained node's files (its checkpoint and judge) and time, as the rank that trained it sends them."""
    paths = [store.path(name), judge.path_of(store.directory, name)]
    return {"files": {p.name: p.read_bytes() for p in paths if p.is_file()}, "seconds": timings[f"train_{name}_s"]}


# ---- evaluation ------------------------------------------------------------------------------

def evaluate_node(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData, device=CPU):
    """Test metrics of one node and its per-image predictions (as rows for the CSV); a branch is also
    compared with the parent's own head restricted to the branch's classes. The models run on `device`."""
    spec, model = config.node(name), models[name]
    labels, rows = data.node_labels("test", spec)
    X = parent_normalizer(models["parent"]).lazy(data.test.images)[rows]
    judged = judge.load_for(models, name)
    if judged is None and spec.selfeval is not None and model.meta.path is not None:  # trained by run, shown beside MSP
        judged = judge.load(Path(model.meta.path).parent, name, model)
    head = None
    with on_device({id(m): m for m in models.values()}.values(), device):
        logits = model.logits(node_inputs(models, name, X))
        if spec.source is not None and models["parent"].has_head and set(spec.classes) <= set(config.parent.classes):
            parent = models["parent"]
            head = scores.parent_head(parent.logits(X), config.parent.classes, spec.classes,
                                      Acceptance.of(parent.meta).temperature)
        probability = None if judged is None else judged.score_images(models, X, logits)
    acceptance = Acceptance.of(model.meta)
    metrics, columns = scores.score_node(spec.classes, labels, logits, acceptance, head, probability)
    metrics["confidence_scores"] = confidence.every_score(logits, logits.argmax(axis=1) == labels,
                                                          acceptance.temperature, probability)
    return metrics, scores.prediction_rows(rows, spec.classes, columns, data.test.filenames)


# ---- the whole tree --------------------------------------------------------------------------

def _history_summary(history: dict) -> dict:
    return {k: history[k] for k in ("epochs_run", "best_epoch", "stopped_early")}


def run(config: TreeConfig, data_dir, out_dir, recipe: Recipe, seed: int = 0, download: bool = False,
        progress: bool = True, echo=print, report: bool = True, cache_dir=None, device: torch.device = CPU,
        skip_bad_images: bool = False, compile: bool = False) -> dict:
    """Train the parent and every branch, evaluate all on the test split, write OUT/metrics.json,
    OUT/predictions/<node>.csv, OUT/models/<node>.pt and (with report) OUT/report.md, OUT/report.html and
    OUT/plots/; returns the metrics. OUT is replaced whole at the end (fileio.staged_dir): an error or an
    interrupt leaves it as it was. `compile`: the parent's network trains through torch.compile."""
    recipe.parent_for(config.parent.kind)  # a recipe for this kind of parent, before any work
    if compile:
        check_compile(device)
    if cache_dir is not None and Path(out_dir).resolve() in (Path(cache_dir).resolve(), *Path(cache_dir).resolve().parents):
        raise ConfigError(f"--cache {cache_dir} is inside --out {out_dir}, which a run replaces whole; keep the "
                          f"cache elsewhere")
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ConfigError(f"--cache {cache_dir} is a file; give a folder for the activation cache")
    with staged_dir(out_dir) as out:
        return _run(config, data_dir, out, recipe, seed, download, progress, echo, report, cache_dir, device,
                    skip_bad_images, compile)


def _run(config, data_dir, out: Path, recipe, seed, download, progress, echo, report, cache_dir, device,
         skip_bad_images, compile=False) -> dict:
    start, cpu_start = time.perf_counter(), cpu_seconds()
    before = busy_note(torch.get_num_threads())
    if before:
        echo(f"note: {before}")
    data = load_tree_data(config, data_dir, download=download, progress=progress, skip_bad_images=skip_bad_images,
                          device=device)
    for line in data_notes(data).values():
        echo(f"note: {line}")
    if config.exits():
        exits.check_budget(config, data, device)
    log(plan(config, recipe, seed, device))
    store = ModelStore(out / "models")
    timings: dict[str, float] = {}
    models: dict[str, Model] = {}
    train = lambda spec: _train_node(config, spec, models, data, recipe, seed, progress, cache_dir, device,  # noqa: E731
                                     compile, store)
    for depth, level in enumerate(_levels(config)):
        if depth == 0 or not distributed.sharding():  # the parent trains on every rank together
            timings.update({f"train_{spec.name}_s": train(spec) for spec in level})
            continue
        owner = {spec.name: i % distributed.world() for i, spec in enumerate(level)}  # by position, never by seed
        for spec in level:
            if owner[spec.name] == distributed.rank():
                with distributed.local():
                    timings[f"train_{spec.name}_s"] = train(spec)
        for spec in level:  # each branch's files and time, from the rank that trained it to every other
            mine = owner[spec.name] == distributed.rank()
            sent = distributed.broadcast(_node_files(store, spec.name, timings) if mine else None, owner[spec.name])
            if not mine:
                for name, data_bytes in sent["files"].items():
                    write_bytes(store.directory / name, data_bytes)
                timings[f"train_{spec.name}_s"] = sent["seconds"]
                models[spec.name] = store.load(spec.name)

    t = time.perf_counter()
    metrics = {"seed": seed, "recipe": recipe.name, "config": config.to_dict(), "data": data.facts(),
               "device": str(device), "processes": distributed.world(), "compile": compile, "parent": None,
               "branches": {}}
    for spec in config.nodes():
        if not models[spec.name].has_head:  # a parent without a head: no class logits
            echo(f"parent: {spec.net_kind.describe(spec.shape_dict)} without a head; it has no test accuracy (its "
                 f"branches are evaluated alone)")
            continue
        node_metrics, predictions = evaluate_node(config, spec.name, models, data, device)
        node_metrics.update(train_samples=len(models[spec.name].meta.train_rows),
                            val_samples=len(models[spec.name].meta.val_rows),
                            **_history_summary(models[spec.name].meta.history))
        write_csv(out / "predictions" / f"{spec.name}.csv", predictions, scores.PREDICTION_COLUMNS)
        if spec.source is None:
            metrics["parent"] = node_metrics
        else:
            metrics["branches"][spec.name] = node_metrics
        echo(format_report(spec.name, node_metrics, spec.classes))
    if models["parent"].has_head:
        metrics["tree"], tree_rows = evaluate_tree(config, models, data, device)
        write_csv(out / "tree.csv", tree_rows, scores.PREDICTION_COLUMNS)
        echo(format_tree_report(metrics["tree"], config.parent.classes))
        if config.exits():
            metrics["cascade"] = exits.run_exits(config, models, data, store.directory, device, echo)
    else:
        metrics["tree"] = None
        echo("routed tree: not evaluated (the parent has no head to route by; predict --branch or --node NAME)")
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    timings["cpu_s"] = cpu_seconds() - cpu_start
    metrics["timings"] = timings
    metrics["notes"] = {**data_notes(data),
                        **{n: m.meta.acceptance_note for n, m in models.items() if m.meta.acceptance_note}}
    fought = busy_note(torch.get_num_threads(), timings["cpu_s"], timings["total_s"])
    if fought:
        metrics["notes"]["threads"] = fought
    write_json(out / "metrics.json", metrics)
    if report and distributed.is_main():  # other ranks' `out` is a scratch folder, removed
        from branching.reports.run import write_report  # matplotlib is only loaded when a report is written
        write_report(out)
    return metrics


def run_seeds(config: TreeConfig, data_dir, out_dir, recipe: Recipe, seeds: list[int], echo=print,
              report: bool = True, **options) -> dict:
    """run for each seed into OUT/seed-<n>/, then OUT/metrics.json with the mean and std of every headline
    figure (branching.seeds); returns that summary. `options`: run's own (download, progress, device, ...)."""
    recipe.parent_for(config.parent.kind)
    if options.get("compile"):
        check_compile(options.get("device", CPU))
    with staged_dir(out_dir) as out:
        return _run_seeds(config, data_dir, out, recipe, seeds, echo, report, options)


def _run_seeds(config, data_dir, out: Path, recipe, seeds, echo, report, options) -> dict:
    start = time.perf_counter()
    runs = {}
    for seed in seeds:
        echo(f"#### seed {seed} -> {out / f'seed-{seed}'}")
        runs[seed] = run(config, data_dir, out / f"seed-{seed}", recipe, seed=seed, echo=echo, report=report, **options)
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
    if report and distributed.is_main():
        from branching.reports.run import write_seeds_report  # matplotlib is only loaded when a report is written
        write_seeds_report(out)
    return metrics
