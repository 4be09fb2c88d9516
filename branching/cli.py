"""Command line: `python -m branching run ...` and the entry points of the original's scripts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import ModelStore, script_filename
from .config import DEFAULT_CONFIG, load_config
from .errors import BranchingError, ConfigError
from .metrics import format_report
from .pipeline import evaluate_node, load_tree_data, log, train_branch, train_parent
from .recipes import RECIPES, get_recipe


def guarded(main):
    """Run main(argv); a BranchingError becomes `error: ...` on stderr and exit status 2, no traceback."""
    def wrapper(argv=None) -> int:
        try:
            return main(argv) or 0
        except BranchingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: `error: ...` on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def add_common(p: argparse.ArgumentParser, models_flag: bool = True) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="tree TOML (default: the original study's)")
    p.add_argument("--data", default="c10", help="folder with the CIFAR-100 python files train, test, meta")
    if models_flag:
        p.add_argument("--models", default="models", help="folder of the model files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="'original' reproduces the original study; 'default' is ours (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=None, help="cap every node's epochs (quick runs)")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR-100; fail if it is missing")


# ---- python -m branching ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m branching", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate the whole tree; writes OUT/metrics.json")
    add_common(run, models_flag=False)
    add_training(run)
    run.add_argument("--out", default="runs/latest", help="output folder (metrics.json, predictions/, models/)")
    run.add_argument("--seeds", default=None, metavar="LIST",
                     help="several seeds, e.g. 0,1,2: each seed's run in OUT/seed-<n>/, mean and std in OUT/ "
                          "(replaces --seed)")
    run.add_argument("--no-report", action="store_true", help="skip OUT/report.md, report.html and plots/")
    run.add_argument("--cache", default=None, metavar="DIR",
                     help="keep branch-training activations in DIR (rebuilt whenever anything they depend on changes)")
    from .predict import add_parser as add_predict
    add_predict(sub)
    from .compare_cli import add_parsers as add_compare
    add_compare(sub)
    return parser


@guarded
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command in ("compare", "probe-layers"):
        from . import compare_cli
        return compare_cli.cmd_compare(args) if args.command == "compare" else compare_cli.cmd_probe_layers(args)
    if args.command == "predict":
        from .predict import cmd_predict
        return cmd_predict(args)
    return 0


def cmd_run(args) -> int:
    from .pipeline import run

    config = load_config(args.config)
    recipe = get_recipe(args.recipe, args.max_epochs)
    if args.seeds is not None and args.cache is not None:
        raise ConfigError("--cache goes with a single --seed: each seed trains its own parent, so nothing is shared")
    if args.seeds is not None:
        from .seeds import parse_seeds, run_seeds

        metrics = run_seeds(config, args.data, args.out, recipe, parse_seeds(args.seeds),
                            download=not args.no_download, progress=not args.quiet, report=not args.no_report)
        print(f"wrote {Path(args.out) / 'metrics.json'} (all seeds {metrics['timings']['all_seeds_s']:.1f} s)")
        return 0
    metrics = run(config, args.data, args.out, recipe, seed=args.seed, download=not args.no_download,
                  progress=not args.quiet, report=not args.no_report, cache_dir=args.cache)
    print(f"wrote {Path(args.out) / 'metrics.json'} (total {metrics['timings']['total_s']:.1f} s)")
    return 0


# ---- the original's scripts ------------------------------------------------------------------

def _script_parser(description: str, training: bool) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    add_common(p)
    if training:
        add_training(p)
    return p


def _retrain_hint(node: str) -> str:
    return ": python parent_branch.py" if node == "parent" else f": python {node}_branch.py"


def _node(config, node: str):
    if node != "parent" and node not in config.branches:
        raise ConfigError(f"{config.path}: no branch {node!r}; branches are: {', '.join(config.branches) or 'none'}")
    return config.node(node)


def train_script(node: str, argv=None) -> int:
    """parent_branch.py / <name>_branch.py: train one node and save it as the original scripts did."""
    @guarded
    def main(argv):
        args = _script_parser(f"Train the {node} of the tree.", training=True).parse_args(argv)
        config = load_config(args.config)
        spec = _node(config, node)
        recipe = get_recipe(args.recipe, args.max_epochs)
        data = load_tree_data(config, args.data, download=not args.no_download, progress=not args.quiet)
        store = ModelStore(args.models, script_names=True)
        hints = {n: _retrain_hint(n) for n in config.branches} | {"parent": _retrain_hint("parent")}
        if spec.source is None:
            model, meta, normalizer = train_parent(config, data, recipe, args.seed, not args.quiet)
            path = store.save(node, model, meta)
            norm_dir = Path(args.models).resolve().parent
            normalizer.save_npy(norm_dir / "parent_X_mean.npy", norm_dir / "parent_X_std.npy")
            log(f"wrote {norm_dir / 'parent_X_mean.npy'} and parent_X_std.npy")
        else:
            models = store.load_tree(config, nodes=[spec.source], hints=hints)
            model, meta = train_branch(config, node, models, data, recipe, args.seed, not args.quiet)
            path = store.save(node, model, meta)
        history = meta["history"]
        print(f"trained {node}: {history['epochs_run']} epochs (best {history['best_epoch']}), "
              f"{history['seconds']:.1f} s; wrote {path}")
        return 0
    return main(argv)


def test_script(node: str, argv=None) -> int:
    """parent_test.py / <name>test.py: evaluate one node on the test split and print the original's table."""
    @guarded
    def main(argv):
        args = _script_parser(f"Evaluate the {node} on the test split.", training=False).parse_args(argv)
        config = load_config(args.config)
        spec = _node(config, node)
        store = ModelStore(args.models, script_names=True)
        hints = {n: _retrain_hint(n) for n in [*config.branches, "parent"]}
        models = store.load_tree(config, nodes=[node], hints=hints)
        data = load_tree_data(config, args.data, download=False)
        metrics, _ = evaluate_node(config, node, models, data)
        print(format_report(f"{node} ({script_filename(node)})", metrics, spec.classes))
        return 0
    return main(argv)
