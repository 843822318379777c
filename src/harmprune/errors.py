"""harmprune's user-facing errors: bad input that the CLI reports as one clear line, not a traceback."""

from __future__ import annotations


class HarmpruneError(Exception):
    """Base class: the message names the file, field or value that is wrong."""


class DataError(HarmpruneError, ValueError):
    """A data set that cannot be read as asked."""


class ModelError(HarmpruneError, RuntimeError):
    """A model that cannot be found or loaded."""


class ScoreFileError(HarmpruneError, ValueError):
    """A score or mask file that is missing, malformed, or does not fit the model or the other file."""


class ConfigError(HarmpruneError, ValueError):
    """An experiment configuration with an unknown key, a missing file or a bad value."""
