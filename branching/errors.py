"""User-facing errors: one line that says what is wrong and how to fix it."""


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
