"""The ``keystep`` command: argument parsing and printing over the Python API (``main`` is the entry point)."""

from .main import main, make_parser

__all__ = ["main", "make_parser"]
