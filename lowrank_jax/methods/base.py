"""What every method shares: array declarations, validation, the per-matrix protocol.

A *method* is a frozen dataclass (hashable, so it can be a static ``jax.jit`` argument and part of a
pytree's aux data) and the **one source of truth** for its math on one weight matrix
``W0 ∈ R^{in×out}`` (Flax layout, ``y = x @ W``), always in float32:

* ``arrays`` — ``{name: ArraySpec}``: what each trainable array *is* (``("in", "rank")`` for an
  ``(in, r)`` factor, ``("out",)`` for a per-output vector, …) and its PEFT tensor name. Shapes,
  counting, sharding specs, LoRA+ groups, file validation and PEFT names are all derived from it;
* ``shared_arrays`` — the same for frozen arrays shared by every layer (VeRA's projections), sized by
  the element-wise maximum ``(max_in, max_out)`` over the targeted matrices;
* ``init_matrix(key, w, shared)`` → ``(params, w_new)`` — trainable arrays, and a replacement for the
  frozen ``W0`` when the init moves part of ``W0`` into the adapter (PiSSA), else ``None``;
* ``merge_matrix(w, params, shared)`` → ``W'`` — the effective weight;
* ``forward(x, y, bias, params, frozen)`` — the factored layer output ``x @ W' + bias`` given the
  base output ``y = x @ W0 + bias`` (matrix view ``(rows, out)``), without forming ``W'``; the
  linen and NNX execution paths only locate ``x``, the kernel and the bias and call this;
* ``frozen_cache(w)`` — one per-kernel array derived from the frozen ``W0`` that ``forward`` may
  read (DoRA's ``‖W0_j‖²``, shape ``(out,)``), stored once at init because ``W0`` never changes;
* ``make_shared(max_in, max_out)`` — the shared frozen arrays, else ``None``;
* ``reads_base_at_init`` — whether ``init_matrix`` or ``frozen_cache`` read the *values* of ``w``
  (default ``True``). A method that only needs its shape (LoRA's random ``A``/zero ``B``, VeRA) says
  ``False``, and ``init`` passes a shape-only stand-in (``.shape``, ``.dtype``, ``.ndim``; reading its
  values raises) instead of dequantizing an NF4 kernel
  (such a method has no ``frozen_cache`` and no new base; ``init`` raises otherwise). Optional for
  methods that do not derive from :class:`MethodBase`: absent means ``True``.

Stacks of layers, multi-axis kernels, dtypes and quantized bases are handled once for all methods by
:mod:`lowrank_jax.tree` (vmap over the stack — a loop for an eager shape-only init —,
:class:`~lowrank_jax.layout.Layout` for axes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax

Array = jax.Array

IN, OUT, RANK = "in", "out", "rank"
_AXES = (IN, OUT, RANK)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """The role of one adapter array: its axes in terms of the adapted matrix, and its PEFT name.

    Args:
      axes: each axis is ``"in"`` (the kernel's input size), ``"out"`` (its output size) or
        ``"rank"`` (the method's rank). ``("in", "rank")`` is LoRA's ``A``; ``("out",)`` DoRA's ``m``.
      peft: suffix of the tensor in a PEFT ``adapter_model.safetensors`` (``"lora_A.weight"``), or
        ``None`` when PEFT has no such tensor. PEFT stores 2-D arrays transposed (torch layout).

    Derived rules: the sharding of an axis is the kernel's input (``in``), output (``out``) or none
    (``rank``); LoRA+ puts arrays without an ``in`` axis in its fast group (PEFT's ``B`` and 1-D
    vectors).

    >>> ArraySpec(("in", "rank")).shape(n_in=384, n_out=64, rank=8)
    (384, 8)
    """

    axes: tuple[str, ...]
    peft: str | None = None

    def __post_init__(self):
        if not self.axes or any(a not in _AXES for a in self.axes):
            raise ValueError(f"ArraySpec axes must be a non-empty tuple of {_AXES}, got {self.axes!r}")

    def shape(self, n_in: int, n_out: int, rank: int) -> tuple[int, ...]:
        """The array's shape on one ``(n_in, n_out)`` matrix."""
        size = {IN: n_in, OUT: n_out, RANK: rank}
        return tuple(size[a] for a in self.axes)

    @property
    def lr_fast(self) -> bool:
        """LoRA+ group: ``True`` (ratio × learning rate) for arrays with no ``in`` axis."""
        return IN not in self.axes


@dataclasses.dataclass(frozen=True)
class FrozenInputs:
    """What a method's factored ``forward`` may read besides its trainable arrays (all frozen).

    Attributes:
      kernel: ``kernel()`` returns ``W0`` as a float32 ``(in, out)`` matrix (dequantized if NF4);
        called only by methods that need it (DoRA's norm), so LoRA never reads the kernel twice.
      shared: the method's shared frozen arrays (VeRA projections), or ``None``.
      cache: the per-kernel array of ``frozen_cache`` (``None`` when absent: recompute it).
    """

    kernel: Callable[[], Array]
    shared: Mapping[str, Array] | None = None
    cache: Array | None = None


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


def check_bool(value: Any, field: str, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: {field} must be a bool, got {value!r}")


class Method(Protocol):
    """The protocol every method value follows (see the module docstring)."""

    targets: tuple[str, ...]
    dropout: float
    quant: Any
    rank: int
    arrays: Mapping[str, ArraySpec]
    shared_arrays: Mapping[str, ArraySpec]

    def check_shape(self, path: str, n_in: int, n_out: int) -> None: ...

    def init_matrix(self, key: Array, w: Array, shared: dict | None) -> tuple[dict[str, Array], Array | None]: ...

    def merge_matrix(self, w: Array, params: dict[str, Array], shared: dict | None) -> Array: ...

    def forward(self, x: Array, y: Array, bias: Array | None, params: dict[str, Array],
                frozen: FrozenInputs) -> Array: ...

    def frozen_cache(self, w: Array) -> Array | None: ...

    def make_shared(self, max_in: int, max_out: int) -> dict[str, Array] | None: ...

    @property
    def reads_base_at_init(self) -> bool: ...


class MethodBase:
    """Defaults every method inherits: shapes from ``arrays``, no shared arrays, no cache."""

    arrays: Mapping[str, ArraySpec] = {}
    shared_arrays: Mapping[str, ArraySpec] = {}

    def param_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the trainable arrays on one ``(n_in, n_out)`` matrix (from :attr:`arrays`)."""
        return {k: s.shape(n_in, n_out, self.rank) for k, s in self.arrays.items()}

    def shared_shapes(self, max_in: int, max_out: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the shared frozen arrays for the given maxima (from :attr:`shared_arrays`)."""
        return {k: s.shape(max_in, max_out, self.rank) for k, s in self.shared_arrays.items()}

    def check_shape(self, path: str, n_in: int, n_out: int) -> None:
        return None

    def make_shared(self, max_in: int, max_out: int) -> dict[str, Array] | None:
        return None

    def frozen_cache(self, w: Array) -> Array | None:
        return None

    @property
    def reads_base_at_init(self) -> bool:
        """Whether ``init_matrix``/``frozen_cache`` read ``w``'s values; ``True`` unless a method knows it
        needs only ``w.shape`` (then ``init`` passes a shape-only stand-in whose values cannot be read)."""
        return True


def count_matrix_params(method: Any, n_in: int, n_out: int) -> int:
    """Trainable scalars of ``method`` on one ``(n_in, n_out)`` matrix."""
    return sum(math.prod(s) for s in method.param_shapes(n_in, n_out).values())
