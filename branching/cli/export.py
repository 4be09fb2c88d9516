"""`branching export --models RUN --out TREE.onnx`: a trained tree as one ONNX graph (branching.api.export)."""

from __future__ import annotations

from pathlib import Path

from branching.api.export import export
from branching.api.tree import CLI_NAMES, Tree
from branching.cli.args import positive_int
from branching.console import log
from branching.errors import ConfigError
from branching.fileio import check_new_file


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained tree as one ONNX graph (onnxruntime runs it; "
                                      "branching.load reads it)",
                       description="Write a trained tree as one ONNX graph: the parent's network as far as the tree "
                                   "reads and every node's probabilities and logits, with the thresholds and classes "
                                   "in its metadata (docs/deploy.md).")
    p.add_argument("--models", required=True, help="models folder of a run (OUT/models, or OUT itself)")
    p.add_argument("--out", required=True, help="the .onnx file to write (written whole once checked; an existing file is replaced)")
    p.add_argument("--no-exits", action="store_true",
                   help="a tree with early exits: export it answering by its full trunk (default: the graph stops its "
                        "trunk where an exit answers)")
    p.add_argument("--check", type=positive_int, default=16, metavar="N",
                   help="random images (or texts) both PyTorch and the graph answer before the file is written "
                        "(default 16)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if Path(args.out).suffix != ".onnx":
        raise ConfigError(f"--out {args.out}: the file name must end in .onnx")
    check_new_file(args.out, "--out")
    tree = Tree.load(args.models, "cpu", exits=not args.no_exits, names=CLI_NAMES)
    log(f"exporting {tree!r}")
    checked = export(tree, args.out, check=args.check)
    size = Path(args.out).stat().st_size / 2**20
    inputs = ("input_ids and attention_mask (N, tokens)" if tree.reads == "texts"
              else f"pixels (N, {3 * tree.image_size ** 2})")
    cascade = getattr(tree.predictor, "cascade", None)  # with no threshold no exit answers: the full trunk's graph
    exits = tree.predictor.exits if cascade is not None and cascade.threshold is not None else ()
    answers = (f"rows.<exit> and logits.<exit> for {', '.join(exits)} (the inputs each answered), then rest.rows and "
               f"probs.<node> and logits.<node> for the others, for {', '.join(n for n in tree.nodes if n not in exits)}"
               if exits else f"probs.<node> and logits.<node> for {', '.join(tree.nodes)}")
    print(f"wrote {args.out} ({size:.1f} MB): inputs {inputs}, outputs {answers}; on {args.check} random {tree.reads} its probabilities are within "
          f"{checked.difference:.1e} of PyTorch's (PyTorch's own vary by {checked.own:.1e} between batch sizes)")
    print(f"load it with: branching.load({str(args.out)!r})  (onnxruntime)")
    return 0
