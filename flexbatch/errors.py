"""Exceptions with messages meant for the user: each names the problem and the fix."""


class FlexbatchError(Exception):
    """Base class of every error flexbatch raises on purpose."""


class ModelFormatError(FlexbatchError):
    """A model folder or file is missing something, or is of an unsupported kind."""


class WeightFileError(FlexbatchError):
    """A weight file is truncated, corrupted, or does not match the model's config."""


class ConfigError(FlexbatchError, ValueError):
    """A user-supplied setting is out of range or inconsistent."""
