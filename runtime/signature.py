"""Keyword arguments written once, as a dataclass's fields, and taken by functions as ``**kwargs``.

``@with_keywords(Fields)`` gives such a function the signature help(), :func:`inspect.signature` and call tips
show: its own parameters with the fields as keyword-only parameters (their names, defaults and types) in place of
its ``**kwargs``. The function builds ``Fields(**kwargs)`` itself, so an unknown keyword is a TypeError as usual.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def with_keywords(fields_class: type) -> Callable[[F], F]:
    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        keywords = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                    for f in dataclasses.fields(fields_class) if f.name not in signature.parameters]
        keyword_only = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        function.__signature__ = signature.replace(parameters=positional + keywords + keyword_only)
        return function

    return decorate
