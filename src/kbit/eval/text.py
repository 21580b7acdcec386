"""Held-out English text that nobody in this project wrote and that ships with Python itself.

The documentation strings of a fixed list of standard-library modules and of their public classes and functions,
collected in a fixed order. It is the same text on every machine with the same Python minor version.
"""

from __future__ import annotations

import importlib
import inspect

MODULES = (
    "argparse", "collections", "csv", "datetime", "decimal", "difflib", "fractions", "functools", "heapq", "json",
    "logging", "pathlib", "pickle", "random", "statistics", "string", "textwrap", "threading", "typing", "zipfile",
)  # fmt: skip


def reference_text(max_chars: int | None = None) -> str:
    """The docstrings of ``MODULES`` and their public members, paragraphs separated by blank lines."""
    parts: list[str] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        if doc := inspect.getdoc(mod):
            parts.append(doc)
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                if (doc := inspect.getdoc(obj)) and len(doc) > 80:  # skip one-liners: mostly signatures
                    parts.append(doc)
    text = "\n\n".join(parts)
    return text[:max_chars] if max_chars else text
