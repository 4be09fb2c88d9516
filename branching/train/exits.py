"""A run's early exits: the cascade fitted on the parent's calibration rows (branching.tree.cascade) and measured on
the test split beside the full trunk (no exit answers) and each exit alone (fitted by the same rule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from branching.acceptance.stats import wilson_interval
from branching.config.tree import TreeConfig
from branching.errors import ConfigError, DataError
from branching.models.device import CPU
from branching.tree import cascade as cascades
from branching.tree.cost import linear_flops
from branching.tree.routing import TreePredictor


EXIT_CALIBRATION = 0.2  # of an encoded parent's training rows, held out of every node when its tree has exits
CALIBRATION_SEED = 7919  # added to the run's seed: the calibration rows are drawn apart from the validation rows


def calibration_split(config: TreeConfig, rows: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, seed: int):
    """(the parent's training positions left, the calibration rows): for a tree with exits, a stratified
    EXIT_CALIBRATION of the training positions, which no node trains or validates on; else (train_idx, None)."""
    if not config.exits():
        return train_idx, None
    try:
        kept, held = train_test_split(np.arange(len(train_idx)), test_size=EXIT_CALIBRATION,
                                      stratify=labels[train_idx], random_state=seed + CALIBRATION_SEED)
    except ValueError:
        raise DataError(f"too few training inputs to hold out {EXIT_CALIBRATION:.0%} of each class for the exits' "
                        f"calibration ({len(train_idx)} left after validation); add inputs, or remove the exits") from None
    return train_idx[np.sort(kept)], rows[train_idx[np.sort(held)]]


@dataclass
class View:
    """What a cascade's fit or measure needs of some inputs: the exits' answers, the tree's, labels, costs."""

    outputs: cascades.ExitOutputs
    guess: np.ndarray
    accepted: np.ndarray
    labels: np.ndarray
    costs: cascades.Costs
    paths: list                # each input's chain through the tree
    tap_costs: np.ndarray      # the trunk's FLOPs to each tap, (N or 1, taps)
    exit_names: tuple
    depth: int                 # the taps the tree reads

    def only(self, models, j: int) -> View:
        """The view of a cascade of exit j alone."""
        outputs, name = self.outputs.only(j), self.exit_names[j]
        return View(outputs, self.guess, self.accepted, self.labels,
                    cascades.input_costs(models, outputs, (name,), self.tap_costs, self.depth, self.paths), self.paths,
                    self.tap_costs, (name,), self.depth)


def view(config: TreeConfig, models: dict, split: str, rows_wanted, data, device=CPU) -> View:
    """The View of the parent's rows of `split` (those in rows_wanted, or all where None)."""
    predictor = TreePredictor(config, models, device=device)
    vectors, labels, rows = data.node_rows(split, config.parent)
    if rows_wanted is not None:
        keep = np.isin(rows, rows_wanted)
        vectors, labels, rows = vectors[keep], labels[keep], rows[keep]
    vectors = np.asarray(vectors, dtype=np.float32)
    exits = tuple(e.name for e in config.exits())
    outputs = cascades.exit_outputs(cascades.exit_routes(config, models, exits, device), vectors,
                                    list(predictor.classes))
    tree = predictor.predict(vectors)
    paths = [tree.chains[f] for f in tree.final_node]
    parent = models["parent"]
    texts = None if data.raw_texts is None else [data.raw_texts[split][int(r)] for r in rows]
    tap_costs = parent.net_kind.tap_costs(parent.shape, texts, device)
    depth = predictor.parent_depth()
    return View(outputs, tree.predicted, tree.accepted, labels,
                cascades.input_costs(models, outputs, exits, tap_costs, depth, paths), paths, tap_costs, exits, depth)


def fit(config, models, v: View) -> cascades.Cascade:
    found = cascades.fit(config.cascade, v.exit_names, v.outputs, v.guess, v.accepted, v.labels, v.costs)
    found.fingerprints = {n: m.fingerprint() for n, m in models.items()}  # the tree's answers count too
    return found


def measure(cascade: cascades.Cascade, v: View) -> dict:
    """The cascade's test figures (cascade.outcome), with a 95% Wilson interval on its accuracy."""
    point = cascades.outcome(cascades.first_exit(v.outputs.gate, cascade.threshold), v.outputs, v.guess,
                             v.accepted, v.labels, v.costs, cascade.threshold is not None)
    right = int(round(point["accuracy"] * len(v.labels))) if len(v.labels) else 0
    return {**point, "threshold": cascade.threshold, "accuracy_ci": wilson_interval(right, len(v.labels))}


def run_exits(config: TreeConfig, models: dict, data, models_dir, device=CPU, echo=print) -> dict:
    """Fit the cascade, save it beside the models, and measure it on the test split; returns metrics["cascade"]."""
    calibration = view(config, models, "train", models["parent"].meta.calibration_rows, data, device)
    cascade = fit(config, models, calibration)
    cascade.save(models_dir)
    test = view(config, models, "test", None, data, device)
    full = measure(cascades.Cascade(cascade.exits, None, cascade.mode, cascade.asked, True, None, None, 0), test)
    chosen = measure(cascade, test)
    single = {}
    for j, name in enumerate(cascade.exits):
        alone = fit(config, models, calibration.only(models, j))
        single[name] = {**measure(alone, test.only(models, j)), "attained": alone.attained}
    curve = [{**cascades.outcome(cascades.first_exit(test.outputs.gate, p["threshold"]), test.outputs,
                                 test.guess, test.accepted, test.labels, test.costs, p["threshold"] is not None),
              "threshold": p["threshold"]} for p in cascade.curve]
    metrics = {"exits": list(cascade.exits), "rule": cascade.describe(), "threshold": cascade.threshold,
               "attained": cascade.attained, "reason": cascade.reason, "bound": cascade.bound,
               "calibration_samples": cascade.samples, "cascade": chosen, "full_trunk": full, "single_exit": single,
               "saved": 1 - chosen["mflops"] / full["mflops"] if full["mflops"] else None,
               "calibration_curve": cascade.curve, "test_curve": curve}
    echo(format_exits(metrics))
    if not cascade.attained:
        echo(f"warning: the exits' cascade could not meet {cascade.describe()}: "
             + ("no exit answers, and the tree's error is not bounded by the risk asked" if cascade.mode == "risk"
                else "it answers at its cheapest setting, above the budget") + f" ({cascade.reason})")
    return metrics


def format_exits(m: dict) -> str:
    """The cascade's lines in a run's output."""
    from branching.tables import pct
    c, f = m["cascade"], m["full_trunk"]
    lines = [f"exits {', '.join(m['exits'])}: {m['rule']}, fitted on {m['calibration_samples']} calibration inputs: "
             + (f"threshold {m['threshold']:.4f}" if m["threshold"] is not None else "no exit answers")
             + (f" (risk bound {m['bound']:.4f})" if m["bound"] is not None else "")
             + ("" if m["attained"] else f"; not met: {m['reason']}"),
             f"  cascade: accuracy {pct(c['accuracy'])}, {c['mflops']:.1f} MFLOPs an input "
             f"({pct(c['mflops'] / f['mflops'])} of the full trunk's {f['mflops']:.1f}); error on what it answers "
             f"{pct(c['risk'])} at coverage {pct(c['coverage'])}; answered at the exits: "
             + ", ".join(f"{n} {pct(s)}" for n, s in zip(m["exits"], c["exits"])),
             f"  full trunk: accuracy {pct(f['accuracy'])}, error on what it answers {pct(f['risk'])} at coverage "
             f"{pct(f['coverage'])}"]
    lines += [f"  {name} alone: accuracy {pct(s['accuracy'])}, {s['mflops']:.1f} MFLOPs, error {pct(s['risk'])} at "
              f"coverage {pct(s['coverage'])}" + ("" if s["attained"] else " (the rule not met alone)")
              for name, s in m["single_exit"].items()]
    lines.append("  branching.load and predict answer with the cascade; the routed tree above is the full trunk's")
    return "\n".join(lines)


def check_budget(config: TreeConfig, data, device=CPU) -> None:
    """A budget below what the first exit costs (the trunk to its tap, a transformer's at the training texts' mean
    length, and its head) is a one-line error before any training."""
    budget = config.cascade.budget
    if budget is None:
        return
    parent, first = config.parent, config.exits()[0]
    kind, shape = parent.net_kind, parent.shape_dict
    texts = None if data.raw_texts is None else list(data.raw_texts["train"])
    head = linear_flops([kind.tap_widths(shape)[first.layer][1], *first.hidden, len(first.classes)])
    cost = (float(kind.tap_costs(shape, texts, device)[:, first.layer].mean()) + head) / 1e6
    if budget < cost:
        at = "" if texts is None else " (at the training texts' mean length)"
        raise ConfigError(f"{config.path or '<config>'}: [parent.cascade] budget: {budget:g} MFLOPs is below the "
                          f"{cost:.1f} MFLOPs an input pays to reach the first exit ({first.name}){at}; raise the "
                          f"budget to {math.ceil(cost)} or more, or add an earlier exit")
