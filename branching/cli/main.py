"""Command line: `branching run ...` (or `python -m branching run ...`) and the entry points of the
original's scripts."""

from __future__ import annotations

import platform
import shlex
import sys
from pathlib import Path

import torch

from branching import __version__
from branching.acceptance.metrics import format_report
from branching.cli.args import TRAINING, TREE, ArgumentParser, flags, guarded, prog_name
from branching.cli.compare import add_parsers as add_compare
from branching.cli.export import add_parser as add_export
from branching.cli.serve import add_parser as add_serve
from branching.cli.init import add_init
from branching.cli.predict import add_parser as add_predict
from branching.cli.selfeval import add_parser as add_selfeval
from branching import distributed
from branching.config.parse import load_config
from branching.config.recipes import get_recipe
from branching.config.tree import DEFAULT_CONFIG
from branching.console import log
from branching.data.tree_data import load_tree_data
from branching.errors import ConfigError
from branching.reports.seeds import parse_seeds
from branching.train.nodes import train_branch, train_parent
from branching.train.run import evaluate_node, run, run_seeds
from branching.tree.checkpoint import ModelStore, script_filename

# ---- branching -------------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=prog_name(), description="Neural Branching: train a tree of a parent network and "
                            "its branches, evaluate it, compare it with baselines, and classify images with it.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[flags(*TREE, *TRAINING, "--skip-bad-images")],
                         help="train and evaluate the whole tree; writes OUT/metrics.json")
    run.add_argument("--out", default="runs/latest", help="output folder (metrics.json, predictions/, models/)")
    run.add_argument("--seeds", default=None, metavar="LIST",
                     help="several seeds, e.g. 0,1,2: each seed's run in OUT/seed-<n>/, mean and std in OUT/ "
                          "(replaces --seed)")
    run.add_argument("--no-report", action="store_true", help="skip OUT/report.md, report.html and plots/")
    run.add_argument("--compile", action="store_true",
                     help="train the parent's network through torch.compile (default off): a compile time of "
                          "10-30 s first; on this CPU it did not train faster, on a GPU it is untested (docs/scale.md); "
                          "a seed's figures change slightly")
    run.add_argument("--cache", default=None, metavar="DIR",
                     help="keep branch-training activations in DIR (rebuilt whenever anything they depend on changes)")
    run.set_defaults(func=cmd_run)
    add_predict(sub)
    add_compare(sub)
    add_init(sub)
    add_selfeval(sub)
    add_export(sub)
    add_serve(sub)
    return parser


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        commands = next(a for a in parser._actions if a.dest == "command").choices
        raise ConfigError(f"give a command: {', '.join(commands)}; see {parser.prog} --help or {parser.prog} "
                          f"COMMAND --help")
    args = parser.parse_args(argv)
    return args.func(args)


def cmd_run(args) -> int:
    config = load_config(args.config)
    recipe = get_recipe(args.recipe, args.max_epochs)
    if args.seeds is not None and args.seed is not None:
        raise ConfigError("--seed and --seeds: give one (--seeds runs each of its seeds)")
    if args.seeds is not None and args.cache is not None:
        raise ConfigError("--cache goes with a single --seed: each seed trains its own parent, so nothing is shared")
    args.device = distributed.start(args.device)  # under torchrun: the process group, once the command is checked
    if args.seeds is not None:
        metrics = run_seeds(config, args.data, args.out, recipe, parse_seeds(args.seeds),
                            download=not args.no_download, progress=not args.quiet, report=not args.no_report,
                            device=args.device, skip_bad_images=args.skip_bad_images, compile=args.compile)
        print(f"wrote {Path(args.out) / 'metrics.json'} (all seeds {metrics['timings']['all_seeds_s']:.1f} s)")
        print(what_to_open(Path(args.out), not args.no_report, {}, config))
        return 0
    metrics = run(config, args.data, args.out, recipe, seed=args.seed or 0, download=not args.no_download,
                  progress=not args.quiet, report=not args.no_report, cache_dir=args.cache, device=args.device,
                  skip_bad_images=args.skip_bad_images, compile=args.compile)
    print(f"wrote {Path(args.out) / 'metrics.json'} (total {metrics['timings']['total_s']:.1f} s)")
    print(what_to_open(Path(args.out), not args.no_report, metrics["notes"], config))
    return 0


def what_to_open(out: Path, report: bool, notes: dict, config) -> str:
    """The end of a run: what needs attention, then the files to open, and a predict command that works for this
    tree (a parent without a head routes nothing: its first branch is named)."""
    lines = [f"note: {note}" for note in notes.values()]
    parent = config.parent
    inputs = '"A TEXT" or --texts FILE' if parent.net_kind.reads == "texts" else "IMAGE_OR_FOLDER"
    routed = [c.name for c in config.children("parent") if not c.new_classes]
    if not parent.net_kind.has_head(parent.shape_dict) and len(routed) > 1:
        inputs = f"--branch {routed[0]} {inputs}"
    if report:
        lines.append(f"open {out / 'report.html'} (or report.md; figures in {out / 'plots'}/); predict with: "
                     f"{prog_name()} predict --models {out} {inputs}")
    else:
        lines.append(f"results in {out / 'metrics.json'}; predict with: {prog_name()} predict --models {out} "
                     f"{inputs}")
    return "\n".join(lines)


# ---- the original's scripts ------------------------------------------------------------------

SCRIPT_BRANCHES = ("fish", "flower")  # fish_branch.py, fishtest.py, flower_branch.py, flowertest.py


def _retrain_hint(node: str, script_branch: str, config_path: str) -> str:
    """`: python <script> ...`, the command that trains `node` again."""
    if node == "parent":
        words = ["python", "parent_branch.py"]
    elif node in SCRIPT_BRANCHES:
        words = ["python", f"{node}_branch.py"]
    else:
        words = ["python", f"{script_branch}_branch.py", "--branch", node]
    if config_path != str(DEFAULT_CONFIG):
        words += ["--config", config_path]
    return ": " + shlex.join(words)


class _Script:
    """What a script knows once its arguments are read: args, config, its node, the model folder, hints."""

    def __init__(self, default: str, training: bool, argv):
        branch = default != "parent"
        task = "Train" if training else "Evaluate"
        what = f"a branch of the tree (default {default!r})" if branch else "the parent of the tree"
        parser = ArgumentParser(
            description=f"{task} {what}{'' if training else ' on the test split'}.",
            parents=[flags(*TREE, "--models", *((*TRAINING, "--skip-bad-images") if training else ()))])
        if branch:
            parser.add_argument("--branch", default=default, metavar="NAME",
                                help=f"the branch of --config to {task.lower()} (default {default}); its model "
                                     f"file is NAMEnet_2.pt in --models")
        self.args = parser.parse_args(argv)
        self.config = load_config(self.args.config)
        self.node = self.args.branch if branch else "parent"
        if branch and self.node not in self.config.branches:
            known = ", ".join(self.config.branches)
            raise ConfigError(f"{self.config.path}: no branch {self.node!r}; "
                              + (f"its branches are {known}; pass --branch NAME with one of them" if known
                                 else "it has no branches"))
        self.spec = self.config.node(self.node)
        self.store = ModelStore(self.args.models, script_names=True)
        script_branch = default if branch else SCRIPT_BRANCHES[0]
        self.hints = {n: _retrain_hint(n, script_branch, self.args.config) for n in ["parent", *self.config.branches]}


@guarded
def train_script(node: str, argv=None) -> int:
    """parent_branch.py / fish_branch.py / flower_branch.py: train one node and save it as the original
    scripts did; `node` is the parent or the default of --branch."""
    script = _Script(node, training=True, argv=argv)
    args, config, node = script.args, script.config, script.node
    recipe = get_recipe(args.recipe, args.max_epochs)
    recipe.parent_for(config.parent.kind)
    data = load_tree_data(config, args.data, download=not args.no_download, progress=not args.quiet,
                          skip_bad_images=args.skip_bad_images, device=args.device)
    if script.spec.source is None:
        model, meta, normalizer = train_parent(config, data, recipe, args.seed or 0, not args.quiet, args.device)
        path = script.store.save(node, model, meta)
        norm_dir = Path(args.models).resolve().parent
        normalizer.save_npy(norm_dir / "parent_X_mean.npy", norm_dir / "parent_X_std.npy")
        log(f"wrote {norm_dir / 'parent_X_mean.npy'} and parent_X_std.npy")
    else:
        models = script.store.load_tree(config, nodes=[script.spec.source], hints=script.hints)
        model, meta = train_branch(config, node, models, data, recipe, args.seed or 0, not args.quiet,
                                   device=args.device)
        path = script.store.save(node, model, meta)
    history = meta.history
    print(f"trained {node}: {history['epochs_run']} epochs (best {history['best_epoch']}), "
          f"{history['seconds']:.1f} s; wrote {path}")
    return 0


@guarded
def test_script(node: str, argv=None) -> int:
    """parent_test.py / fishtest.py / flowertest.py: evaluate one node on the test split and print the
    original's table; `node` is the parent or the default of --branch."""
    script = _Script(node, training=False, argv=argv)
    models = script.store.load_tree(script.config, nodes=[script.node], hints=script.hints)
    data = load_tree_data(script.config, script.args.data, download=False)
    metrics, _ = evaluate_node(script.config, script.node, models, data)
    print(format_report(f"{script.node} ({script_filename(script.node)})", metrics, script.spec.classes))
    return 0
