"""One family of errors. ``cli.py`` alone turns them into one stderr line and an exit code."""


class MemcalcError(Exception):
    """Base class: the message is one line saying what is wrong and what to do."""

    exit_code = 2


class UsageError(MemcalcError):
    """A flag, number or combination of flags is invalid."""

    exit_code = 2


class ModelNotFoundError(MemcalcError):
    """A model name, path or hub id could not be resolved to a config."""

    exit_code = 3


class ConfigError(MemcalcError):
    """A config file exists but cannot be read or lacks what an inventory needs."""

    exit_code = 4


class UnsupportedModelError(MemcalcError):
    """The config's model_type has no pure-Python inventory and the fallback cannot run."""

    exit_code = 5
