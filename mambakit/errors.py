"""Errors raised for bad input. The CLI turns them into a message and exit code 2."""


class MambaKitError(ValueError):
    """Invalid user input (argument, configuration, data or checkpoint)."""


class CheckpointError(MambaKitError):
    """A checkpoint directory is missing, unreadable or does not match its configuration."""
