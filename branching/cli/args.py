"""Command-line plumbing shared by every command: one-line errors, the shared flags, argument types."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import os
import re
import signal
import sys
import threading

import torch

from branching import distributed
from branching.config.recipes import RECIPES
from branching.config.tree import DEFAULT_CONFIG
from branching.errors import BranchingError, did_you_mean
from branching.models.device import resolve_device
from branching.reports.seeds import MAX_SEED


def guarded(main):
    """Run main; a BranchingError becomes `error: ...` on stderr and exit status 2, no traceback.

    Usage errors and --help (argparse's SystemExit) become the status they carry, so that main can be
    called in-process and always returns an int.

    Under torchrun only rank 0 speaks: the other ranks' output is discarded, so an error every rank meets (a
    BranchingError, a usage error) is printed once; an exception of one rank alone still prints its traceback
    there; each rank exits with its own status.
    """
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints as \xNN, never an error
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        previous = _on_sigterm(_terminate)
        try:
            with contextlib.ExitStack() as stack:
                if not distributed.is_main():  # its own crash still shows: a traceback leaves through here
                    sink = stack.enter_context(open(os.devnull, "w"))
                    stack.enter_context(contextlib.redirect_stdout(sink))
                    stack.enter_context(contextlib.redirect_stderr(sink))
                return main(*args, **kwargs) or 0
        except BranchingError as e:
            if distributed.is_main():
                print(f"error: {e}", file=sys.stderr)
            elif distributed.own_error(e):  # met by this rank alone (a branch it trained): only it can say
                print(f"error (rank {distributed.rank()}): {e}", file=sys.stderr)
            return 2
        except SystemExit as e:  # argparse has already printed the help or the `error: ...` line
            return e.code if isinstance(e.code, int) else 2
        except Terminated:  # on a line of its own, after any progress bar's
            print(f"{_fresh_line()}terminated; nothing was left half-written", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print(f"{_fresh_line()}interrupted; nothing was left half-written", file=sys.stderr)
            return 130
        finally:
            _on_sigterm(previous)
            distributed.stop()
    return wrapper


def _fresh_line() -> str:
    """A newline where a progress bar (tqdm) is still open on stderr's line, else nothing."""
    try:
        from tqdm import tqdm
        return "\n" if any(not getattr(bar, "disable", True) for bar in list(tqdm._instances)) else ""
    except Exception:  # noqa: BLE001 - only for looks
        return ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as on Ctrl-C (temporary files removed)."""


def _terminate(signum, frame):
    raise Terminated


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every default: "(default X)" is added where the help text does not give it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (False, argparse.SUPPRESS) or not action.option_strings:
            return text
        if action.default is None:
            return f"{text} (default: none)" if action.nargs != 0 and not action.required else text
        return f"{text} (default {action.default})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: `error: ...` on stderr, exit status 2, with "did you
    mean" for a misspelt flag; flags are never abbreviated (`--max-ep` is an error, not --max-epochs)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # read by error() for its hints
        return super().parse_known_args(args, namespace)

    def error(self, message):
        command = self._command()
        where = f"{self.prog} {command}" if command and not self.prog.endswith(command) else self.prog
        self.exit(2, f"error: {message}{self._suggestion(message, command)}; see {where} --help\n")

    def _commands(self) -> dict:
        return next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})

    def _command(self) -> str | None:
        """The command named in the arguments being parsed (None for a parser without commands)."""
        commands = self._commands()
        return next((word for word in getattr(self, "_argv", []) if word in commands), None)

    def _suggestion(self, message: str, command: str | None) -> str:
        commands = self._commands()
        if message.startswith("argument command: invalid choice:") and commands:
            word = message.split("'")[1] if "'" in message else ""
            return did_you_mean(word, commands)
        parsers = [self] + ([commands[command]] if command else [])  # extra flags are reported by the top parser
        known = [s for parser in parsers for action in parser._actions for s in action.option_strings]
        if message.startswith("unrecognized arguments:"):
            words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
        elif message.startswith("the following arguments are required:"):  # e.g. --model for --models
            words = [w.split("=")[0] for w in getattr(self, "_argv", []) if w.startswith("-") and w.split("=")[0] not in known]
        else:
            return ""
        close = {word: _closest_flag(word, known) for word in words}
        hints = [f"{match!r} for {word!r}" for word, match in close.items() if match]
        if hints:
            return f" (did you mean {', '.join(hints)}?)" if len(words) > 1 else f" (did you mean {close[words[0]]!r}?)"
        return f" ({command} has no flag {words[0]})" if words and command else ""


def _closest_flag(word: str, flags) -> str | None:
    """The flag closest to a misspelt one, compared without their dashes (else every flag looks alike)."""
    names = {flag.lstrip("-"): flag for flag in flags if flag.startswith("--")}
    close = difflib.get_close_matches(word.lstrip("-"), list(names), n=1, cutoff=0.6)
    return names[close[0]] if close else None


# ---- flags that several commands take --------------------------------------------------------

def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 <= seed <= MAX_SEED."""
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}, got {value}")
    return value


def device_name(text: str) -> torch.device:
    """argparse type: auto, cpu, cuda or cuda:N, and it must exist here; the command passes the device to
    whatever trains a model."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu or cuda; got {text!r}")
    try:
        return resolve_device(text)
    except (ValueError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


# Each shared flag is declared here once; `flags` makes parent parsers of them for `parents=[...]`.
SHARED_FLAGS = {
    "--config": dict(default=str(DEFAULT_CONFIG), help="tree TOML (default: the original study's fish and flower "
                                                     "tree, configs/original.toml)"),
    "--data": dict(default="c10", help="folder with the CIFAR-100 python files train, test, meta, or image "
                                         "folders train/CLASS/*, test/CLASS/* (val/ optional; groups of classes "
                                         "as folders above them)"),
    "--models": dict(default="models", help="folder of the model files"),
    "--quiet": dict(action="store_true", help="no progress bars"),
    "--recipe": dict(default="default", choices=sorted(RECIPES),
                     help="'original' reproduces the original study; 'default' is ours (default)"),
    "--seed": dict(type=seed_int, default=None, help="seed of the training (default 0)"),
    "--max-epochs": dict(type=positive_int, default=None, help="cap every node's epochs, for quick runs (default: each recipe's own)"),
    "--no-download": dict(action="store_true", help="never download CIFAR-100; fail if it is missing"),
    "--skip-bad-images": dict(action="store_true", help="image folders: leave out unreadable images (the run "
                                                          "records which) instead of stopping"),
    "--device": dict(type=device_name, default="auto",
                     help="where models train, read features and are evaluated: auto (CUDA when available, with "
                          "mixed precision), cpu or cuda; an MLP node's fused routing arithmetic stays on the CPU "
                          "(default auto)"),
}
TREE = ("--config", "--data", "--quiet")
TRAINING = ("--recipe", "--seed", "--max-epochs", "--no-download", "--device")


def flags(*names: str, **help_texts: str) -> ArgumentParser:
    """A parent parser holding the shared flags `names`, in that order; `seed="..."` (the flag's dest)
    gives a command its own help text for a flag."""
    parent = ArgumentParser(add_help=False)
    for name in names:
        options = dict(SHARED_FLAGS[name])
        dest = name.lstrip("-").replace("-", "_")
        if dest in help_texts:
            options["help"] = help_texts[dest]
        parent.add_argument(name, **options)
    return parent


def prog_name() -> str:
    """How this command was started: `python -m branching` or the installed `branching`."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "python -m branching" if main_spec is not None and main_spec.name == "branching.__main__" else "branching"


def study_parser(sub, name: str, help_text: str, out: str, out_help: str = "output folder (replaced whole at the end)"):
    """The parser of a study over seeds (compare, selfeval): the tree flags, --out and --seeds."""
    p = sub.add_parser(name, parents=[flags(*TREE, "--no-download", "--max-epochs", "--device")], help=help_text)
    p.add_argument("--out", default=out, help=out_help)
    p.add_argument("--seeds", default="0,1,2", metavar="LIST", help="seeds, comma-separated (default 0,1,2)")
    return p

