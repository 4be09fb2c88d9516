"""Command line of `branching selfeval`."""

from __future__ import annotations

import shlex
from pathlib import Path

from branching.acceptance.stats import BOOTSTRAP
from branching.cli.args import positive_int, study_parser
from branching import distributed
from branching.console import log
from branching.errors import ConfigError
from branching.config.parse import load_config


def add_parser(sub) -> None:
    p = study_parser(sub, "selfeval", "every confidence score of every node (max softmax, DOCTOR, energy, margin, "
                     "self-evaluation branches, oracle); writes OUT/selfeval.md, .json, .png", "runs/selfeval")
    p.add_argument("--nodes", default=None, metavar="LIST",
                   help="the nodes to score, e.g. mammals,plants (default: every node; a parent's five "
                        "cross-fitted copies are the bulk of the time)")
    p.add_argument("--bootstrap", type=positive_int, default=BOOTSTRAP,
                   help=f"resamples of the paired bootstrap intervals (default {BOOTSTRAP})")
    p.set_defaults(func=cmd_selfeval)


def cmd_selfeval(args) -> int:
    from branching.reports.seeds import parse_seeds
    from branching.studies.selfeval import run_selfeval_compare

    config = load_config(args.config)
    named = [] if args.nodes is None else [config.node(name).name for name in args.nodes.split(",")]  # known names
    left_out = [n for n in named if n in config.branches and config.exit_of(n)]
    if left_out:
        raise ConfigError(f"--nodes {args.nodes}: {', '.join(left_out)} answer{'s' if len(left_out) == 1 else ''} in "
                          f"the exits' cascade (an exit or below one), which selfeval leaves out: `branching run` fits "
                          f"the cascade and `branching compare` measures it; name other nodes")
    if config.exits():
        config = config.without_exits()
        log("selfeval: the exits and the branches below them are left out (an exit's confidence is fitted with the "
            "cascade's by `branching run`; `branching compare` measures it)")
    seeds = parse_seeds(args.seeds)
    nodes = None if args.nodes is None else [config.node(name).name for name in args.nodes.split(",")]
    args.device = distributed.start(args.device)
    words = ["python", "-m", "branching", "selfeval", "--config", args.config, "--data", args.data,
             "--seeds", args.seeds, "--out", args.out] + ([] if nodes is None else ["--nodes", args.nodes])
    if args.max_epochs is not None:
        words += ["--max-epochs", str(args.max_epochs)]
    result = run_selfeval_compare(config, args.data, args.out, seeds, max_epochs=args.max_epochs,
                                  download=not args.no_download, progress=not args.quiet,
                                  command=shlex.join(words), n_boot=args.bootstrap, nodes=nodes,
                                  device=args.device)
    print(Path(args.out, "selfeval.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'selfeval.md'}, selfeval.json, selfeval.png "
          f"(total {result['timings']['total_s'] / 60:.1f} min)")
    return 0
