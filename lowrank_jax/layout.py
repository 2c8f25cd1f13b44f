"""How a kernel of any rank is seen as a stack of ``(in, out)`` matrices.

Flax kernels are contracted as ``y = x @ W``. A ``nn.Dense`` kernel is already the matrix ``(in, out)``;
a multi-axis kernel (``nn.DenseGeneral`` attention ``(d, heads, head_dim)``, ``nn.Einsum`` ``"NDH"``)
and a kernel stacked by ``nn.scan`` (leading layer axes) are not. A :class:`Layout` says which axes of
the kernel are stacked layers, which are contracted with the input (``in``) and which are produced
(``out``). The matrix view of a kernel ``W`` with layout ``L`` is

    W_mat = transpose(W, stack + in + out).reshape(*stack_shape, prod(in_shape), prod(out_shape))

and every method works on ``W_mat``; :func:`from_matrix` is the exact inverse.

A layout is never guessed from a name: 2-D kernels default to ``(in, out)``; anything else needs an
explicit layout (``layouts={regex: Layout(...)}``) or one found by the shape-only probe
:func:`lowrank_jax.discover`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax.numpy as jnp

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Layout:
    """Axes roles of a kernel: ``stack`` leading layer axes, then ``in_axes``/``out_axes``.

    ``in_axes`` and ``out_axes`` index the *per-layer* kernel (the kernel with the ``stack`` leading
    axes removed), together they must be a permutation of ``range(ndim - stack)``.

    Examples:
      * ``nn.Dense`` kernel ``(in, out)``: ``Layout()`` (the default).
      * ``nn.DenseGeneral(features=(heads, head_dim))`` kernel ``(d, heads, head_dim)``:
        ``Layout(in_axes=(0,), out_axes=(1, 2))``.
      * attention output ``(heads, head_dim, d)``: ``Layout(in_axes=(0, 1), out_axes=(2,))``.
      * the same under ``nn.scan`` over 4 layers, kernel ``(4, d, heads, head_dim)``:
        ``Layout(in_axes=(0,), out_axes=(1, 2), stack=1)``.
    """

    in_axes: tuple[int, ...] = (0,)
    out_axes: tuple[int, ...] = (1,)
    stack: int = 0

    def __post_init__(self):
        object.__setattr__(self, "in_axes", tuple(int(a) for a in self.in_axes))
        object.__setattr__(self, "out_axes", tuple(int(a) for a in self.out_axes))
        if not self.in_axes or not self.out_axes:
            raise ValueError(f"Layout needs at least one in and one out axis, got {self}")
        if self.stack < 0:
            raise ValueError(f"Layout.stack must be >= 0, got {self.stack}")
        axes = sorted(self.in_axes + self.out_axes)
        if axes != list(range(len(axes))):
            raise ValueError(
                f"Layout in_axes {self.in_axes} and out_axes {self.out_axes} must together be a "
                f"permutation of 0..{len(axes) - 1}"
            )

    @property
    def ndim(self) -> int:
        """Rank of the full (stacked) kernel this layout describes."""
        return self.stack + len(self.in_axes) + len(self.out_axes)

    def check(self, shape: Sequence[int], path: str) -> None:
        """Raise ``ValueError`` naming ``path`` when ``shape`` does not fit this layout."""
        if len(shape) != self.ndim:
            raise ValueError(
                f"{path}: kernel of shape {tuple(shape)} (rank {len(shape)}) does not fit {self} "
                f"(rank {self.ndim})"
            )

    def stack_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[: self.stack])

    def in_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[self.stack + a] for a in self.in_axes)

    def out_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[self.stack + a] for a in self.out_axes)

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(prod(in_shape), prod(out_shape))`` of one layer."""
        return math.prod(self.in_shape(shape)), math.prod(self.out_shape(shape))

    def _perm(self) -> tuple[int, ...]:
        s = self.stack
        return tuple(range(s)) + tuple(s + a for a in self.in_axes) + tuple(s + a for a in self.out_axes)

    def is_identity(self) -> bool:
        return self._perm() == tuple(range(self.ndim)) and len(self.in_axes) == 1 and len(self.out_axes) == 1

    def to_matrix(self, w: Array) -> Array:
        """Kernel ``(*stack, *per-layer)`` → ``(*stack, in, out)``."""
        if self.is_identity():
            return w
        n_in, n_out = self.matrix_shape(w.shape)
        return jnp.transpose(w, self._perm()).reshape(*self.stack_shape(w.shape), n_in, n_out)

    def from_matrix(self, m: Array, shape: Sequence[int]) -> Array:
        """Inverse of :meth:`to_matrix` for a kernel of the given full ``shape``."""
        if self.is_identity():
            return m
        perm = self._perm()
        permuted_shape = tuple(shape[p] for p in perm)
        inverse = tuple(perm.index(i) for i in range(len(perm)))
        return jnp.transpose(m.reshape(permuted_shape), inverse)


DEFAULT_LAYOUT = Layout()


def resolve_layout(path: str, shape: tuple[int, ...], layouts: Mapping[str, Layout] | None) -> Layout:
    """The layout of the kernel at ``path``: exact key, then first regex key, then the 2-D default.

    Raises ``ValueError`` naming ``path`` for a kernel of 3+ axes without a layout (never guessed)
    or one whose rank does not fit the layout given.
    """
    from lowrank_jax.paths import lookup

    layout = lookup(layouts, path)
    if layout is not None:
        layout.check(shape, path)
        return layout
    if len(shape) == 2:
        return DEFAULT_LAYOUT
    raise ValueError(
        f"{path}: kernel of shape {tuple(shape)} has {len(shape)} axes, so which are stacked layers, inputs "
        f"and outputs is ambiguous. Pass layouts={{{path!r}: lowrank_jax.Layout(in_axes=..., "
        f"out_axes=..., stack=...)}} or layouts=lowrank_jax.discover(model, variables, *example_args)."
    )
