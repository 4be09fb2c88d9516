"""`branching selfeval`: which confidence score tells a node's right answers from its wrong ones best?

Per seed the tree is trained once (default recipe); then for every node (parent and branches) every
score is computed on the same test images: max softmax at T = 1 and at the fitted temperature,
DOCTOR, energy, margin, self-evaluation branches on each tap of what the node reads, on all of them,
and on the logits alone, and an oracle (the correctness itself, the best any score can do). The
cross-fitted labels (branching.selfeval) are computed once per node and shared by its judges. Results
over seeds: branching.selfeval_report.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import rankdata

from branching.acceptance import confidence, selective
from branching.acceptance.rule import Acceptance
from branching.acceptance.stats import BOOTSTRAP, paired_bootstrap_interval, sample_summary, t_interval
from branching.config.recipes import get_recipe
from branching.config.tree import DEFAULT_FOLDS, SelfEvalSpec, TreeConfig
from branching.console import log
from branching.data.normalization import Normalizer
from branching.data.tree_data import load_tree_data
from branching.fileio import staged_dir
from branching.models.device import CPU
from branching.models.forward import node_inputs
from branching.train import selfeval
from branching.train.nodes import train_branch, train_parent
from branching.tree import judge

BASELINE = "msp_t"
COVERAGE_GRID = np.linspace(0.02, 1.0, 50)
METRICS = ("aurc", "eaurc", "auroc", "fpr95")


def node_taps(config: TreeConfig, name: str) -> list:
    """Indices of the taps a judge of node `name` can read: the hidden layers (MLP), the layers (text) or the
    stages or blocks of its source (the parent's own for the parent)."""
    source = config.node(config.node(name).source or "parent")
    return list(range(len(source.taps()) // tap_step(source)))


def tap_step(source) -> int:
    """Entries of a source's taps per layer: pre and post (MLP), one per pooling (an encoded parent), else one."""
    return len(source.net_kind.wheres)


def judge_variants(config: TreeConfig, name: str) -> dict[str, tuple[str, SelfEvalSpec]]:
    """{key: (label, spec)}: a judge on each tap, on all taps, on the logits alone; the node's declared
    [... .selfeval] table gives hidden, folds and the rest (defaults otherwise)."""
    base = config.node(name).selfeval or SelfEvalSpec(layers=(-1,))
    source = config.node(config.node(name).source or "parent")
    names = [t["name"] for t in source.taps()][::tap_step(source)]
    taps = node_taps(config, name)
    out = {f"selfeval_{t}": (f"self-evaluation on {names[t].split('.')[0]}", replace(base, layers=(t,), logits=True))
           for t in taps}
    if len(taps) > 1:
        out["selfeval_all"] = (f"self-evaluation on {' + '.join(names[t].split('.')[0] for t in taps)}",
                               replace(base, layers=tuple(taps), logits=True))
    out["selfeval_logits"] = ("self-evaluation on the logits only", replace(base, layers=(), logits=True))
    return out


def train_tree(config: TreeConfig, data, recipe, seed: int, progress: bool, device: torch.device = CPU) -> dict:
    """Every node trained as `run` trains it (judges aside), meta attached."""
    models = {}
    for spec in config.nodes():
        if spec.source is None:
            model, meta, _ = train_parent(config, data, recipe, seed, progress, device)
        else:
            model, meta = train_branch(config, spec.name, models, data, recipe, seed, progress, device=device)
        model.meta = meta
        models[spec.name] = model
    return models


def node_scores(config: TreeConfig, name: str, models: dict, data, recipe, seed: int, progress: bool,
                device: torch.device = CPU) -> dict:
    """Every score of node `name` on its test images, with the correctness they should rank."""
    spec, model = config.node(name), models[name]
    images, labels, _ = data.node_rows("test", spec)
    X = Normalizer.from_dict(models["parent"].meta.normalization).transform(images)
    logits = model.logits(node_inputs(models, name, X))
    correct = logits.argmax(axis=1) == labels
    t = Acceptance.of(model.meta).temperature
    scores = {"msp_1": ("max softmax, T = 1", confidence.msp(logits)),
              BASELINE: ("max softmax, fitted T", confidence.msp(logits, t)),
              "doctor": ("DOCTOR (-D_alpha, fitted T)", confidence.doctor(logits, t)),
              "energy": ("energy (fitted T)", confidence.energy(logits, t)),
              "margin": ("logit margin", confidence.margin(logits))}
    folds = spec.selfeval.folds if spec.selfeval is not None else DEFAULT_FOLDS
    cf = selfeval.crossfit(config, name, models, data, recipe, seed, folds, progress, device)
    log(f"{name}: {folds} copies cross-fitted in {cf.seconds:.0f} s ({100 * cf.correct.mean():.1f}% right)")
    for key, (label, variant) in judge_variants(config, name).items():
        reads = judge.judge_reads(models, name, variant, recipe.branch.where)
        fitted = selfeval.fit_judge(name, variant, reads, selfeval.judge_taps(models, reads, data, cf.rows), cf, seed,
                                    progress, device)
        scores[key] = (label, judge.Judge(fitted).score_images(models, X, logits))
    scores["oracle"] = ("oracle (the correctness itself)", correct.astype(np.float64))
    out = {}
    for key, (label, values) in scores.items():
        values = np.asarray(values, dtype=np.float64)
        out[key] = {"label": label, **confidence.separation(values, correct), "values": values.tolist(),
                    "risk_at_coverage": [selective.risk_at_coverage(values, correct, c) for c in COVERAGE_GRID]}
    return {"test_samples": len(labels), "accuracy": float(correct.mean()), "temperature": t,
            "crossfit": {"folds": folds, "seconds": cf.seconds, "copies_accuracy": float(cf.correct.mean())},
            "correct": correct.tolist(), "scores": out}


def seed_scores(config: TreeConfig, data, recipe, seed: int, progress: bool, wanted=None,
                device: torch.device = CPU) -> dict:
    """Every score of every node (or of the `wanted` ones) for one seed."""
    start = time.perf_counter()
    models = train_tree(config, data, recipe, seed, progress, device)
    nodes = {spec.name: node_scores(config, spec.name, models, data, recipe, seed, progress, device) for spec in config.nodes()
             if models[spec.name].has_head  # a module parent without head = true gives no answers to score
             and (wanted is None or spec.name in wanted)}
    return {"seed": seed, "nodes": nodes, "seconds": time.perf_counter() - start}


# ---- over seeds ---------------------------------------------------------------------------------

def fast_auroc(values, correct) -> float:
    """AUROC from ranks (the Mann-Whitney statistic, ties counted half): confidence.auroc without
    scikit-learn's overhead, for the bootstrap; nan when one class is absent."""
    n_right = int(correct.sum())
    n_wrong = len(correct) - n_right
    if not n_right or not n_wrong:
        return np.nan
    ranks = rankdata(values)
    return float((ranks[correct].sum() - n_right * (n_right + 1) / 2) / (n_right * n_wrong))


def _metric(name: str, values, correct) -> float:
    value = selective.aurc(values, correct) if name == "aurc" else fast_auroc(values, correct)
    return np.nan if value is None else value


def paired_difference(runs: list[dict], key: str, metric: str, n_boot: int = BOOTSTRAP) -> dict:
    """Score `key` minus max softmax at the fitted T, on the same images: mean over seeds, a t interval over
    the seeds' differences, and (AURC, AUROC) a paired bootstrap interval over the test images, each resample
    the same images for both scores and every seed (the test images are the same every seed). E-AURC
    differences equal AURC differences (same answers, same optimum)."""
    per_seed = [r["scores"][key][metric] - r["scores"][BASELINE][metric] for r in runs
                if r["scores"][key][metric] is not None and r["scores"][BASELINE][metric] is not None]
    out = {"mean": float(np.mean(per_seed)) if per_seed else None, "values": per_seed, "ci95_seeds": t_interval(per_seed)}
    if metric in ("aurc", "auroc") and key != BASELINE:
        arrays = [(np.asarray(r["scores"][key]["values"]), np.asarray(r["scores"][BASELINE]["values"]),
                   np.asarray(r["correct"], dtype=bool)) for r in runs]
        statistic = lambda idx: float(np.mean([_metric(metric, s[idx], c[idx]) - _metric(metric, b[idx], c[idx])  # noqa: E731
                                               for s, b, c in arrays]))
        out["ci95_images"] = paired_bootstrap_interval(statistic, len(arrays[0][2]), n_resamples=n_boot)
    return out


def summarise(seed_results: list[dict], n_boot: int = BOOTSTRAP) -> dict:
    """Per node and score: mean ± std of each metric over seeds and its paired difference to msp at T."""
    out = {}
    for name in seed_results[0]["nodes"]:
        runs = [r["nodes"][name] for r in seed_results]
        rows = out[name] = {}
        for key, first in runs[0]["scores"].items():
            row = {"label": first["label"]}
            for metric in METRICS:
                row[metric] = sample_summary([r["scores"][key][metric] for r in runs])
                if key not in (BASELINE, "oracle"):
                    row[f"delta_{metric}"] = paired_difference(runs, key, metric, n_boot)
            row["risk_at_coverage"] = np.nanmean(np.array([r["scores"][key]["risk_at_coverage"] for r in runs],
                                                          dtype=np.float64), axis=0).tolist()
            rows[key] = row
        out[name]["_node"] = {"accuracy": sample_summary([r["accuracy"] for r in runs]),
                              "test_samples": runs[0]["test_samples"]}
    return out


def run_selfeval_compare(config: TreeConfig, data_dir, out_dir, seeds: list[int], max_epochs: int | None = None,
                         download: bool = False, progress: bool = False, command: str = "",
                         n_boot: int = BOOTSTRAP, nodes: list[str] | None = None,
                         device: torch.device = CPU) -> dict:
    """seed_scores for each seed (of every node, or of `nodes`), the summary, and OUT/selfeval.{json,md,png}
    (OUT replaced whole)."""
    from branching.reports.selfeval import write_outputs  # matplotlib only when writing
    recipe = get_recipe("default", max_epochs)
    recipe.parent_for(config.parent.kind)  # before any work
    with staged_dir(out_dir) as out:
        start, cpu_start = time.perf_counter(), time.process_time()
        data = load_tree_data(config, data_dir, download=download, progress=progress, device=device)
        seed_results = []
        for seed in seeds:
            log(f"#### selfeval: seed {seed}")
            seed_results.append(seed_scores(config, data, recipe, seed, progress, nodes, device))
        setup = {"command": command, "config": config.path, "data": str(data_dir), "seeds": list(seeds),
                 "max_epochs": max_epochs, "recipe": recipe.name, "parent_kind": config.parent.kind,
                 "bootstrap_resamples": n_boot, "coverage_grid": COVERAGE_GRID.tolist(),
                 "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} "
                            f"threads), training on {device}"}
        result = {"setup": setup, "summary": summarise(seed_results, n_boot),
                  "seeds": [{"seed": r["seed"], "seconds": r["seconds"],
                             "nodes": {n: {k: v for k, v in node.items() if k != "correct"}
                                       for n, node in r["nodes"].items()}} for r in seed_results],
                  "timings": {"total_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}}
        write_outputs(out, result)
        return result
