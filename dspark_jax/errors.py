"""The library's error hierarchy: every error a user can cause names the input and what to do."""

from converters.errors import FormatError


class DSparkError(Exception):
    """Base class of every error raised on purpose by dspark_jax."""


class ConfigError(DSparkError, ValueError):
    """A configuration (config.json, YAML preset, argument combination) is invalid or unsupported."""


class CheckpointError(DSparkError, FormatError):
    """A checkpoint file is missing, corrupt, incomplete, or does not match its config."""


class InputError(DSparkError, ValueError):
    """A request (prompt, sampling setting, length) cannot be served as given."""


class HubError(CheckpointError):
    """A Hugging Face repo id could not be resolved to a checkpoint directory (not cached while offline, no such
    repo or revision, no network)."""
