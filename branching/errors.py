"""User-facing errors: one line that says what is wrong and how to fix it."""

import difflib
import re


class BranchingError(Exception):
    """Base of every error the command line reports as `error: <message>` and exit 2."""


class ConfigError(BranchingError):
    """The tree configuration (TOML) or a command-line value is invalid."""


class MissingPackageError(ConfigError):
    """A package the tree needs (a network's code or weights) is not installed: the message names the pip command."""


class DataError(BranchingError):
    """Data files are missing, truncated, unsafe or of the wrong shape."""


class CheckpointError(BranchingError):
    """A model file is missing, corrupt, or does not belong with the models it is used with."""


class OutputError(BranchingError):
    """An output path cannot be written, or is not a folder this project may replace."""


def did_you_mean(word, choices) -> str:
    """" (did you mean 'x'?)" for the choice closest to a misspelt `word`, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""



def past_or_close(word, choices) -> str:
    """" (the last is 'block15')" for a numbered name past the last of its series (block16 of block0..block15),
    else did_you_mean: a close spelling of a number past the end would point at another layer."""
    found = re.fullmatch(r"(.*?)(\d+)", str(word))
    if found:
        numbers = [int(m.group(2)) for m in (re.fullmatch(r"(.*?)(\d+)", str(c)) for c in choices)
                   if m and m.group(1) == found.group(1)]
        if numbers and int(found.group(2)) > max(numbers):
            return f" (the last is {found.group(1) + str(max(numbers))!r})"
    return did_you_mean(word, choices)
