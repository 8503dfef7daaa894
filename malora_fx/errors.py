"""Exceptions raised by malora-fx.

Every error a user can cause by bad input derives from :class:`MaloraError`;
the CLI turns it into a one-line message and exit status 2.
"""


class MaloraError(Exception):
    """A problem with the user's input: a model, a config value, a file."""


class ConfigError(MaloraError, ValueError):
    """A configuration value is out of its allowed range."""


class ModelSourceError(MaloraError):
    """A model source (path or built-in name) cannot be loaded."""


class TargetError(MaloraError):
    """The target selection matches no linear site, or is malformed."""


class PassContractError(MaloraError):
    """A graph pass was given a graph in a state it does not run on (or left one it promised not to)."""


class AdapterFileError(MaloraError):
    """Adapter files are missing, malformed, or do not fit the model."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
