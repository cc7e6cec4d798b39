"""Errors a user can act on. The CLI prints them as one line; --debug shows the traceback."""


class BmcError(Exception):
    """A failure caused by input or environment, reported without a traceback."""

    exit_code = 1


class UsageError(BmcError):
    """Bad command-line usage: unknown names, out-of-range values (exit 2)."""

    exit_code = 2


class DataError(BmcError):
    """A data set is missing, malformed or cannot feed the model."""


class ModelError(BmcError):
    """A model cannot be built for the requested input."""


class CheckpointError(BmcError):
    """A run directory or checkpoint is missing, corrupt or does not match."""


class TrainingError(BmcError):
    """Training cannot go on: the loss diverged."""
