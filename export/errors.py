"""Errors raised for bad user input while loading or exporting a model (printed without a traceback)."""

from keystep.runtime.errors import KeystepError


class ModelLoadError(KeystepError, ValueError):
    """The model directory or checkpoint is missing, unreadable or not the expected kind."""
