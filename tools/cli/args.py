"""argparse pieces every keystep command line shares: one-line errors, and list flags that accumulate."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """Errors as one line (``keystep generate: error: argument --steps: invalid int value: 'x'``), not usage + error.
    Sub-parsers made by ``add_subparsers`` are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Extend(argparse.Action):
    """A list flag (``nargs="+"``) given twice accumulates: ``--prompt "a cat" --prompt "a dog"`` is both prompts,
    ``--class 1 2 --class 3`` is [1, 2, 3]. The default is replaced by the first use, never extended."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, *values])


def list_flag(parser, *flags: str, **kwargs):
    """``add_argument`` for a list flag: ``nargs="+"`` with :class:`Extend`."""
    return parser.add_argument(*flags, nargs="+", action=Extend, **kwargs)
