"""Matrix views of a layer call: how its input and output map to ``x_mat @ W_mat = y_mat``.

A recognised layer contracts some axes of its input ``x`` with the kernel's ``in`` axes and produces
the kernel's ``out`` axes. :class:`CallView` turns ``x`` into ``x_mat (rows..., in)`` and an adapter
output ``y_mat (rows..., out)`` back into the layer's output layout, so every method's factored math
(written for ``(in, out)`` matrices) serves ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` alike.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax.numpy as jnp

from lowrank_jax.layout import Layout


@dataclasses.dataclass(frozen=True)
class CallView:
    """Index bookkeeping for one call.

    ``x_perm`` moves the contracted input axes last (in kernel ``in`` order); ``rows`` is the shape of
    the remaining input axes (flattened into one axis in the matrix view, so the adapter's thin
    products are plain 2-D GEMMs — batched 3-D dots cost XLA extra activation copies); ``out_shape`` the kernel's ``out`` axes; ``y_perm`` maps
    ``(rows..., out...)`` to the layer's output axis order.
    """

    x_perm: tuple[int, ...]
    rows: tuple[int, ...]
    in_size: int
    out_shape: tuple[int, ...]
    y_perm: tuple[int, ...] | None
    layout: Layout  # per-call layout of the kernel (stack = 0)
    bias_perm: tuple[int, ...] | None = None   # bias axes (output order) -> kernel out-axes order

    def x_to_mat(self, x):
        if self.x_perm != tuple(range(len(self.x_perm))):
            x = jnp.transpose(x, self.x_perm)
        return x.reshape(-1, self.in_size)            # rows flattened: plain 2-D GEMMs

    def mat_to_y(self, ym):
        y = ym.reshape(*self.rows, *self.out_shape)
        return y if self.y_perm is None else jnp.transpose(y, self.y_perm)

    def y_to_mat(self, y):
        if self.y_perm is not None:
            inv = tuple(self.y_perm.index(i) for i in range(len(self.y_perm)))
            y = jnp.transpose(y, inv)
        return y.reshape(-1, math.prod(self.out_shape))

    def bias_to_mat(self, bias):
        """The layer's bias (over its output axes, in output order) as an ``(out,)`` vector in the
        matrix view's column order."""
        if self.bias_perm is None:
            return bias.reshape(-1)
        shape = tuple(self.out_shape[self.bias_perm.index(i)] for i in range(len(self.bias_perm)))
        return jnp.transpose(bias.reshape(shape), self.bias_perm).reshape(-1)


def dense_view(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> CallView:
    """``nn.Dense``: ``y = x @ W``, ``W (in, out)``."""
    nd = len(x_shape)
    return CallView(tuple(range(nd)), tuple(x_shape[:-1]), kernel_shape[0], (kernel_shape[1],), None, Layout())


def dense_general_view(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], axis) -> CallView:
    """``nn.DenseGeneral(features, axis)`` with no batch dims: kernel ``(*x.shape[axis], *features)``."""
    nd = len(x_shape)
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    axis = tuple(a % nd for a in axis)
    rest = tuple(i for i in range(nd) if i not in axis)
    n_in = len(axis)
    in_size = math.prod(x_shape[a] for a in axis)
    out_shape = tuple(kernel_shape[n_in:])
    layout = Layout(tuple(range(n_in)), tuple(range(n_in, len(kernel_shape))))
    return CallView(rest + axis, tuple(x_shape[i] for i in rest), in_size, out_shape, None, layout)


def parse_einsum(spec: str, x_ndim: int) -> tuple[str, str, str]:
    """``"...d,dnh->...nh"`` → ``(x_labels, kernel_labels, out_labels)`` with ellipses expanded."""
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"einsum string {spec!r} must have the form 'x,kernel->out'")
    lhs, out = spec.split("->")
    xs, ks = lhs.split(",")
    if "..." in ks:
        raise ValueError(f"einsum string {spec!r}: the kernel operand cannot have an ellipsis")
    used = set(xs + ks + out) - {"."}
    free = [c for c in string.ascii_letters if c not in used]
    if "..." in xs:
        n_ell = x_ndim - (len(xs) - 3)
        ell = "".join(free[:n_ell])
        xs, out = xs.replace("...", ell), out.replace("...", ell)
    return xs, ks, out


def einsum_layout(spec: str, x_ndim: int) -> Layout | None:
    """Kernel layout of an einsum, or ``None`` when the kernel has axes that are neither in nor out."""
    xs, ks, out = parse_einsum(spec, x_ndim)
    in_axes = tuple(i for i, c in enumerate(ks) if c in xs and c not in out)
    out_axes = tuple(i for i, c in enumerate(ks) if c in out and c not in xs)
    if len(in_axes) + len(out_axes) != len(ks) or not in_axes or not out_axes:
        return None
    return Layout(in_axes, out_axes)


def einsum_view(spec: str, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> CallView | None:
    """View of ``jnp.einsum(spec, x, kernel)``, or ``None`` if it is not a plain contraction."""
    layout = einsum_layout(spec, len(x_shape))
    if layout is None:
        return None
    xs, ks, out = parse_einsum(spec, len(x_shape))
    in_labels = [ks[i] for i in layout.in_axes]
    out_labels = [ks[i] for i in layout.out_axes]
    rest = [c for c in xs if c not in in_labels]
    if sorted(rest + out_labels) != sorted(out) or len(set(xs)) != len(xs):
        return None
    x_perm = tuple(xs.index(c) for c in rest + in_labels)
    dims = dict(zip(xs, x_shape))
    in_size = math.prod(dims[c] for c in in_labels)
    out_shape = tuple(kernel_shape[i] for i in layout.out_axes)
    order = rest + out_labels
    y_perm = tuple(order.index(c) for c in out)
    y_perm = None if y_perm == tuple(range(len(y_perm))) else y_perm
    bias_order = [c for c in out if c in out_labels]          # flax Einsum's bias axes
    bias_perm = tuple(bias_order.index(c) for c in out_labels)
    bias_perm = None if bias_perm == tuple(range(len(bias_perm))) else bias_perm
    return CallView(x_perm, tuple(dims[c] for c in rest), in_size, out_shape, y_perm, layout, bias_perm)
