"""The one error tree of loraforge.

    LoraforgeError                 base of everything loraforge raises on purpose
    ├── ConfigError (ValueError)   a bad option, flag or YAML key
    ├── DataError (ValueError)     a dataset that cannot be used; carries every problem found
    ├── ModelError (RuntimeError)  a base model or adapter that is missing or unreadable
    └── CheckpointError (RuntimeError)  nothing to resume from, or a checkpoint of another run

Each message says what was received, where, and what to do about it. The CLI prints the
message on one line (no traceback) and exits with status 1.
"""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base class for errors loraforge raises deliberately."""


class ConfigError(LoraforgeError, ValueError):
    """A configuration value, flag or YAML key is invalid."""


class DataError(LoraforgeError, ValueError):
    """A dataset cannot be used as given."""


class ModelError(LoraforgeError, RuntimeError):
    """A base model or adapter is missing or cannot be loaded."""


class CheckpointError(LoraforgeError, RuntimeError):
    """No usable checkpoint, or one that belongs to a different run."""
