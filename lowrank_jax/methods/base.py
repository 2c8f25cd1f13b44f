"""What every method shares: target normalisation, argument validation, the per-matrix protocol.

A *method* is a frozen dataclass (hashable, so it can be a static ``jax.jit`` argument and part of a
pytree's aux data). It knows the math for **one** weight matrix ``W0 ∈ R^{in×out}`` (Flax layout,
``y = x @ W``), always in float32:

* ``param_shapes(n_in, n_out)`` — shapes of its trainable arrays;
* ``init_matrix(key, w, shared)`` → ``(params, w_new)`` — trainable arrays, and a replacement for the
  frozen ``W0`` when the init moves part of ``W0`` into the adapter (PiSSA), else ``None``;
* ``merge_matrix(w, params, shared)`` → ``W'`` — the effective weight;
* ``branch(x, params, shared)`` / ``output_scale(w, params)`` — the factored forward pieces used by
  :func:`lowrank_jax.apply`: ``y = output_scale ⊙ (x @ W0 + branch(dropout(x)))``;
* ``make_shared(max_in, max_out)`` — frozen arrays shared by all layers (VeRA), else ``None``.

Stacks of layers, multi-axis kernels, dtypes and quantized bases are handled once for all methods by
:mod:`lowrank_jax.tree` (vmap over the stack, :class:`~lowrank_jax.layout.Layout` for axes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

import jax

Array = jax.Array


def normalize_targets(targets: str | Sequence[str], what: str = "targets") -> tuple[str, ...]:
    """Return ``targets`` as a tuple of regex strings, each checked to compile."""
    if isinstance(targets, str):
        targets = (targets,)
    elif isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets) and len(targets) > 0:
        targets = tuple(targets)
    else:
        raise TypeError(f"{what} must be a regex string or a non-empty list of regex strings, got {targets!r}")
    for t in targets:
        try:
            re.compile(t)
        except re.error as e:
            raise ValueError(f"{what}: invalid regular expression {t!r}: {e}") from None
    return targets


def matches(targets: tuple[str, ...], path: str) -> bool:
    """``True`` when any regex in ``targets`` ``re.fullmatch``es ``path``."""
    return any(re.fullmatch(t, path) for t in targets)


def check_rank(rank: Any, name: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name}: rank must be an integer >= 1, got {rank!r}")


def check_alpha(alpha: Any, name: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name}: alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def check_dropout(dropout: Any, name: str) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


class Method(Protocol):
    """The protocol every method value follows (see the module docstring)."""

    targets: tuple[str, ...]
    dropout: float
    quant: Any

    def param_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]: ...

    def check_shape(self, path: str, n_in: int, n_out: int) -> None: ...

    def init_matrix(self, key: Array, w: Array, shared: dict | None) -> tuple[dict[str, Array], Array | None]: ...

    def merge_matrix(self, w: Array, params: dict[str, Array], shared: dict | None) -> Array: ...

    def branch(self, x: Array, params: dict[str, Array], shared: dict | None) -> Array: ...

    def output_scale(self, w: Array | None, params: dict[str, Array], cache: Any = None) -> Array | None: ...

    def make_shared(self, max_in: int, max_out: int) -> dict[str, Array] | None: ...


def count_matrix_params(method: Method, n_in: int, n_out: int) -> int:
    """Trainable scalars of ``method`` on one ``(n_in, n_out)`` matrix."""
    return sum(math.prod(s) for s in method.param_shapes(n_in, n_out).values())
