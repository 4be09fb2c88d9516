"""`branching serve --models RUN`: a trained tree behind HTTP on this machine (branching.api.serve)."""

from __future__ import annotations

from branching.api.serve import MAX_BYTES, check_port, serve
from branching.api.tree import CLI_NAMES, Tree
from branching.cli.args import flags, positive_int
from branching.console import log


def add_parser(sub) -> None:
    p = sub.add_parser("serve", parents=[flags("--device")],
                       help="answer images or texts over HTTP (POST /predict, GET /health, a page at /); needs "
                            "pip install fastapi uvicorn")
    p.add_argument("--models", required=True, help="models folder of a run (OUT/models, OUT itself) or an exported "
                                                   ".onnx tree")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="inputs answered together at most (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others, in ms (default 5)")
    p.add_argument("--max-bytes", type=positive_int, default=MAX_BYTES,
                   help=f"the largest request body accepted (default {MAX_BYTES:,}); larger ones get 413")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]  # before anything loads
    if missing:
        from branching.errors import MissingPackageError
        raise MissingPackageError(f"{' and '.join(missing)} not installed; pip install fastapi uvicorn (branching "
                                  f"serve needs them)")
    if args.port > 65535:
        from branching.errors import ConfigError
        raise ConfigError(f"--port {args.port}: a port is at most 65535")
    check_port(args.host, args.port)
    tree = Tree.load(args.models, args.device, names=CLI_NAMES)
    log(f"serving {tree!r} on http://{args.host}:{args.port}/ (POST /predict, GET /health); Ctrl-C stops")
    serve(tree, args.host, args.port, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
          max_bytes=args.max_bytes)
    return 0
