"""User-facing errors: one line that says what is wrong and how to fix it."""

import difflib


class BranchingError(Exception):
    """Base of every error the command line reports as `error: <message>` and exit 2."""


class ConfigError(BranchingError):
    """The tree configuration (TOML) or a command-line value is invalid."""


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

