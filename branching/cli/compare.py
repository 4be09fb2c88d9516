"""Command line of `branching compare` and `branching probe-layers`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from branching import distributed
from branching.cli.args import TREE, flags, study_parser
from branching.config.parse import load_config
from branching.config.tree import DEFAULT_CONFIG
from branching.errors import CheckpointError, ConfigError


def add_parsers(sub) -> None:
    compare = study_parser(sub, "compare", "every branch against its baselines and ablations, and early exits' "
                           "cascade against the full trunk and each exit alone; writes OUT/compare.md, compare.json, "
                           "compare.png", "runs/compare")
    compare.add_argument("--original-parent", action="store_true",
                         help="train a parent with the original recipe for the original-recipe branches "
                              "(about 9 minutes per seed); default: they use the default-recipe parent")
    compare.add_argument("--kshot", default=None, metavar="LIST",
                         help="also train every method on k images per class of each branch, e.g. "
                              "5,10,25,50,100,all; writes a k-shot table and compare-kshot.png")
    compare.set_defaults(func=cmd_compare)
    probe = sub.add_parser("probe-layers",
                           parents=[flags(*TREE, "--no-download", "--seed", "--max-epochs", "--device",
                                          config="tree TOML (default: the tree the --models record, else the "
                                                 "original study's)",
                                          seed="seed of the parent trained without --models (default 0)",
                                          max_epochs="cap the epochs of that parent (default: the recipe's own)")],
                           help="linear probe on every hidden layer of the parent for each branch's classes; "
                                "recommends the layer to branch from")
    probe.add_argument("--models", default=None, metavar="DIR",
                       help="trained models of a run (OUT/models) or of the scripts (models/); default: "
                            "train a parent (and any branch that others read) with the default recipe")
    probe.set_defaults(func=cmd_probe_layers, config=None)


def cmd_compare(args) -> int:
    from branching.reports.seeds import parse_seeds
    from branching.studies.compare import run_compare
    from branching.studies.kshot import parse_kshot

    seeds = parse_seeds(args.seeds)
    kshot = parse_kshot(args.kshot) if args.kshot is not None else None
    config = load_config(args.config)
    if config.parent.net_kind.compare_methods is None:
        raise ConfigError(f"{config.path}: compare is not built for a {config.parent.kind} parent (kind = "
                          f"\"{config.parent.kind}\"): its baselines train or fine-tune the parent; use run and "
                          f"probe-layers")
    args.device = distributed.start(args.device)
    result = run_compare(config, args.data, args.out, seeds, max_epochs=args.max_epochs,
                         original_parent=args.original_parent, download=not args.no_download,
                         progress=not args.quiet, command=_command(args), kshot=kshot, device=args.device)
    print(Path(args.out, "compare.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.json, compare.png "
          f"(total {result['timings']['total_s'] / 60:.1f} min)")
    return 0


def _command(args) -> str:
    """The command line that reproduces a compare run."""
    launch = (["torchrun", "--nnodes", os.environ.get("GROUP_WORLD_SIZE", "1"), "--nproc-per-node",
               os.environ.get("LOCAL_WORLD_SIZE", "1")] if distributed.launched() else ["python"])
    words = [*launch, "-m", "branching", "compare", "--config", args.config, "--data", args.data,
             "--out", args.out, "--seeds", args.seeds]
    if args.no_download:
        words.append("--no-download")
    if args.max_epochs is not None:
        words += ["--max-epochs", str(args.max_epochs)]
    if args.original_parent:
        words.append("--original-parent")
    if args.kshot is not None:
        words += ["--kshot", args.kshot]
    words += ["--device", str(args.device)]
    return shlex.join(words)


def _load_models(config, directory):
    from branching.tree.checkpoint import ModelStore

    directory = Path(directory)
    if not any(directory.glob("*.pt")) and any((directory / "models").glob("*.pt")):
        directory = directory / "models"  # a run folder, as predict takes it
    store = ModelStore(directory, script_names=not (directory / "parent.pt").exists())
    sources = ["parent", *sorted({b.source for b in config.branches.values()} - {"parent"})]
    try:
        return store.load_tree(config, nodes=sources)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (or leave out --models to train a parent here)") from None


def cmd_probe_layers(args) -> int:
    from branching.config.recipes import get_recipe
    from branching.data.tree_data import load_tree_data
    from branching.studies.probe import format_probe_table, run_probe_layers, train_sources
    from branching.tables import in_texts

    if args.config is None and args.models is not None:  # the tree the models record
        from branching.tree.checkpoint import load_folder
        config, _ = load_folder(args.models)
    else:
        config = load_config(args.config or DEFAULT_CONFIG)
    if not config.branches:
        raise ConfigError(f"{config.path or args.models}: no branches to probe for")
    args.device = distributed.start(args.device)
    if args.models is None:
        config = config.reading_every_tap()  # a text parent trained here encodes every layer
    data = load_tree_data(config, args.data, download=not args.no_download, progress=not args.quiet,
                          device=args.device)
    if args.models is not None:
        models = _load_models(config, args.models)
        origin = f"models from {args.models}"
    else:
        recipe = get_recipe("default", args.max_epochs)
        models = train_sources(config, data, recipe, args.seed or 0, progress=not args.quiet, device=args.device)
        epochs = models["parent"].meta.history["epochs_run"]
        origin = (f"a parent trained here with the default recipe, seed {args.seed or 0}, {epochs} epochs, "
                  f"{models['parent'].meta.history['seconds']:.0f} s")
        parent = models["parent"]
        if parent.net_kind.encoded:
            origin = (f"{parent.net_kind.describe(parent.shape)} as the parent (frozen, every layer encoded), its "
                      f"hold-out drawn with seed {args.seed or 0}")
        elif parent.net_kind.trunk == "frozen":
            origin = (f"{parent.net_kind.describe(parent.shape)} as the parent, loaded here (frozen), its hold-out "
                      f"drawn with seed {args.seed or 0}")
    table, best, seconds = run_probe_layers(config, models, data)
    print(f"Linear probes on {origin}; {len(table)} probes in {seconds:.1f} s.")
    print(in_texts(format_probe_table(table, best), models["parent"].net_kind.reads))
    return 0
