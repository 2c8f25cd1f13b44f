"""Parameter paths: the ``/``-joined keys that targets, layouts, files and errors name.

A leaf's path is its key path with each element written as a string (dict key, attribute name or
sequence index) and joined with ``/``: ``encoder/layer_0/attention/query/kernel``. Two different
leaves must never share a path string, so a key that itself contains ``/`` is refused
(:func:`flatten_with_paths` raises naming both key paths).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax


def key_name(k: Any) -> str:
    """One path element as a string (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def key_value(k: Any) -> Any:
    """One path element as the key it is (a dict key keeps its type; an index stays an int)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """``/``-joined path of a ``jax.tree_util`` key path."""
    return "/".join(key_name(k) for k in path)


def flatten_with_paths(tree: Any, is_leaf=None) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, leaf), ...], treedef)`` with string paths; raises when two leaves share a path."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    out = [(path_str(p), v) for p, v in leaves]
    if len({p for p, _ in out}) != len(out):
        seen: dict[str, Any] = {}
        for (p, _), (kp, _) in zip(out, leaves):
            if p in seen:
                raise ValueError(
                    f"two different parameter paths map to the same name {p!r}: {jax.tree_util.keystr(seen[p])} "
                    f"and {jax.tree_util.keystr(kp)}; rename the keys (a key must not contain '/')")
            seen[p] = kp
    return out, treedef


def example_paths(paths: Sequence[str], k: int = 12) -> str:
    """The first ``k`` paths, comma-separated, for error messages."""
    shown = list(paths[:k])
    more = f" … ({len(paths) - k} more)" if len(paths) > k else ""
    return ", ".join(shown) + more


def lookup(table: Any, path: str) -> Any:
    """``table[path]`` for an exact key, else the value of the first regex key that fullmatches."""
    if not table:
        return None
    if path in table:
        return table[path]
    return next((v for k, v in table.items() if re.fullmatch(k, path)), None)
