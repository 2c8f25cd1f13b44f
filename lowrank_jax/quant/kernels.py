"""``quantize``: a params tree → the same tree with its linear kernels stored as NF4 (QLoRA's base).

bitsandbytes' ``load_in_4bit`` quantizes every linear layer of a model whatever an adapter targets,
and keeps embeddings and norms in 16-bit. :func:`quantize` is that, as a pure tree transform that
composes with :func:`lowrank_jax.init`::

    frozen_q = lowrank_jax.quantize(params, lowrank_jax.NF4(), rest_dtype="bfloat16")
    frozen, adapter = lowrank_jax.init(lowrank_jax.LoRA(rank=8, targets=r".*/(query|value)/kernel"),
                                       frozen_q, key)

Each selected kernel ``W`` (with :class:`~lowrank_jax.layout.Layout` ``L``) becomes an
:class:`~lowrank_jax.quant.nf4.NF4Array` of its transposed matrix view, one matrix per stacked layer::

    q = nf4.quantize(swapaxes(L.to_matrix(W), -1, -2), batch_dims=L.stack)      # torch (out, in)

so the bytes equal bitsandbytes' for the same torch weight, and the array remembers ``L`` and the
per-layer kernel shape, so :func:`kernel_of` rebuilds ``W``'s shape exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.layout import Layout, resolve_layout
from lowrank_jax.paths import flatten_with_paths
from lowrank_jax.quant import nf4
from lowrank_jax.quant.config import NF4

Array = jax.Array

DEFAULT_TARGETS = r"(.*/)?kernel"
_REST_DTYPES = ("float32", "bfloat16", "float16")


def is_quantized(x: Any) -> bool:
    """``True`` for a frozen leaf stored as an :class:`~lowrank_jax.quant.nf4.NF4Array`."""
    return isinstance(x, nf4.NF4Array)


def _stacked_layout(q: nf4.NF4Array) -> Layout:
    lay = q.kernel_layout if q.kernel_layout is not None else Layout()
    return Layout(lay.in_axes, lay.out_axes, len(q.batch_shape))


def kernel_shape_of(q: nf4.NF4Array) -> tuple[int, ...]:
    """Full shape (stack axes first) of the kernel ``q`` stores."""
    per_layer = q.kernel_shape if q.kernel_shape is not None else (q.shape[1], q.shape[0])
    return tuple(q.batch_shape) + tuple(per_layer)


def layout_of(q: nf4.NF4Array) -> Layout:
    """The layout of the stored kernel, with its stack axes (``batch_shape``)."""
    return _stacked_layout(q)


def matrix_of(q: nf4.NF4Array, dtype: Any = jnp.float32) -> Array:
    """The stored kernel as ``(*stack, in, out)`` matrices (dequantized, ``dtype``)."""
    return jnp.swapaxes(nf4.dequantize(q, dtype), -1, -2)


def kernel_of(q: nf4.NF4Array, dtype: Any = None) -> Array:
    """The dequantized kernel in its original shape and (by default) dtype."""
    dtype = q.dtype if dtype is None else dtype
    return layout_of(q).from_matrix(matrix_of(q, jnp.float32), kernel_shape_of(q)).astype(dtype)


def quantize_kernel(w: Array, layout: Layout, config: NF4, dtype: Any, path: str = "kernel") -> nf4.NF4Array:
    """NF4 of one kernel ``w`` (any rank; ``layout`` with its stack axes) stored in ``dtype``, as
    :func:`quantize` stores it; errors name ``path`` (a NaN/inf kernel raises ValueError)."""
    q, finite = quantize_kernel_flagged(w, layout, config, dtype, path)
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        _raise_not_finite_kernel(w, config, dtype, path)
    return q


@partial(jax.jit, static_argnums=(1, 2))
def _torch_rows(w: Array, layout: Layout, dtype: str) -> Array:
    """``swapaxes(L.to_matrix(W), -1, -2)`` in ``dtype`` with each ``(out, in)`` matrix flattened row-major:
    ``(*stack, out·in)``, as one compiled copy.

    The quantizer reads it flat anyway, so it compiles once per element count, not per shape: an MLP's
    up and down projections (transposes of each other) share one quantizer program. The copy is its own
    program because a transpose fused into the quantizer's blockwise reductions reads with a stride and
    runs ~4x slower on XLA:CPU (measured).
    """
    m = jnp.swapaxes(layout.to_matrix(w), -1, -2).astype(dtype)
    return m.reshape(*m.shape[: layout.stack], -1)


def quantize_kernel_flagged(w: Array, layout: Layout, config: NF4, dtype: Any,
                            path: str = "kernel") -> tuple[nf4.NF4Array, Array]:
    """:func:`quantize_kernel` without the host check: ``(q, finite)`` (see
    :func:`lowrank_jax.quant.nf4.quantize_flagged`)."""
    try:
        w = jnp.asarray(w)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"quantize expects a floating-point array, got dtype {w.dtype}")
        n_in, n_out = layout.matrix_shape(tuple(w.shape))
        q, finite = nf4.quantize_flagged(_torch_rows(w, layout, str(jnp.dtype(dtype))),
                                         block_size=config.block_size, double_quant=config.double_quant,
                                         batch_dims=layout.stack)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: cannot NF4-quantize this kernel: {e}") from None
    per_layer = tuple(w.shape)[layout.stack:]
    return q.replace(shape=(n_out, n_in), kernel_layout=Layout(layout.in_axes, layout.out_axes, 0),
                     kernel_shape=per_layer, compute_dtype=config.compute_dtype), finite


def _raise_not_finite_kernel(w: Array, config: NF4, dtype: Any, path: str) -> None:
    """Raise the checked quantizer's error naming ``path``, with the count of NaN/inf values (after the cast
    to the storage ``dtype``, as quantized) and the index of the first in the kernel's own axes (``w`` as
    given, not its transposed matrix view)."""
    try:
        nf4.quantize(jnp.asarray(w).astype(dtype), block_size=config.block_size, double_quant=config.double_quant)
    except ValueError as e:
        raise ValueError(f"{path}: cannot NF4-quantize this kernel: {e}") from None
    raise AssertionError(f"{path}: the NF4 finite flag and the checked quantizer disagree")  # unreachable


def requantize_like(w: Array, q: nf4.NF4Array) -> nf4.NF4Array:
    """NF4 of the kernel ``w`` with ``q``'s settings (block size, double quant, layout, compute dtype)."""
    config = NF4(block_size=q.block_size, double_quant=q.double_quant, compute_dtype=q.compute_dtype)
    return quantize_kernel(w, layout_of(q), config, q.dtype)


def quantize(params: Any, config: NF4 | None = None, *, layouts: Mapping[str, Layout] | None = None,
             rest_dtype: Any = None) -> Any:
    """Store every kernel matching ``config.targets`` as NF4 (bitsandbytes' ``load_in_4bit``).

    Args:
      params: a params tree (nested dicts of arrays; a linen ``params`` collection,
        :func:`lowrank_jax.execution.nnx.params_of` of an NNX model). Leaves already quantized stay.
      config: :class:`~lowrank_jax.NF4` (block size, double quantization, compute dtype, targets).
        ``NF4().targets`` is ``None``: every floating leaf named ``kernel`` with at least 2 dims —
        every linear layer; embeddings and norms are kept.
      layouts: ``{path or regex: Layout}`` for kernels that are not ``(in, out)`` matrices (multi-axis,
        ``nn.scan``-stacked), e.g. :func:`lowrank_jax.discover`'s result. A selected kernel of 3+
        axes without one is an error (its in/out split is never guessed).
      rest_dtype: also cast every other floating leaf to this dtype (``"bfloat16"``: QLoRA's
        16-bit embeddings and norms); ``None`` keeps them.

    Returns:
      The tree with the same structure; selected kernels are :class:`~lowrank_jax.quant.nf4.NF4Array`
      (:func:`kernel_of` restores the shape), no float copy of them is kept. Traceable: under
      ``jax.eval_shape`` on ``ShapeDtypeStruct`` params it allocates nothing. Params placed with
      ``NamedSharding`` on a multi-device mesh give NF4 leaves placed along their blocks
      (:func:`lowrank_jax.sharding.nf4_specs`), computed by one jitted program.

    Raises:
      ValueError naming the path: a target that matches no leaf, a selected leaf that is not a
      floating array of 2+ dims, a 3+-axis kernel without a layout; then (checked after every kernel
      is quantized, with one device transfer) the first kernel with NaN/inf, with their count and the
      index of the first.

    >>> import jax.numpy as jnp, lowrank_jax as lj
    >>> q = lj.quantize({"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}, lj.NF4())
    >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"].dtype
    ('NF4Array', dtype('float32'))
    """
    config = NF4() if config is None else config
    if not isinstance(config, NF4):
        raise TypeError(f"quantize: config must be lowrank_jax.NF4(...), got {config!r}")
    from lowrank_jax.methods.base import matches

    targets = config.targets

    def run(params):
        return quantize_selected(
            params, config, layouts=layouts, rest_dtype=rest_dtype,
            select=(lambda p: matches(targets, p)) if targets is not None else None,
            what=f"NF4 targets {list(targets)}" if targets is not None else None)

    # Params placed on a multi-device mesh: one jitted program, NF4 leaves placed along their blocks.
    from lowrank_jax import sharding
    placed = sharding.quantize_placed(run, params)
    return run(params) if placed is None else placed


def quantize_selected(params: Any, config: NF4, *, layouts: Mapping[str, Layout] | None,
                      rest_dtype: Any, select: Callable[[str], bool] | None, what: str | None) -> Any:
    """:func:`quantize` with an explicit path predicate (``None``: the default linear kernels)."""
    from lowrank_jax.tree import SHARED_KEY

    if isinstance(params, Mapping) and SHARED_KEY in params:
        raise ValueError(f"quantize: params contain {SHARED_KEY!r}, i.e. a frozen tree from lowrank_jax.init; "
                         "quantize the original params first, then call init on the result")
    rest = None
    if rest_dtype is not None:
        rest = jnp.dtype(rest_dtype).name
        if rest not in _REST_DTYPES:
            raise ValueError(f"quantize: rest_dtype must be one of {_REST_DTYPES}, got {rest_dtype!r}")
    leaves, treedef = flatten_with_paths(params, is_leaf=is_quantized)
    default = select is None
    if default:
        import re
        select = lambda p: re.fullmatch(DEFAULT_TARGETS, p) is not None  # noqa: E731
    out, hits = [], 0
    flagged: list[tuple[str, Any, Layout, Any, Array]] = []   # (path, kernel, layout, dtype, finite)
    for path, leaf in leaves:
        if is_quantized(leaf):
            hits += select(path)
            out.append(leaf)
            continue
        dtype = getattr(leaf, "dtype", None)
        floating = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
        if select(path) and (not default or (floating and getattr(leaf, "ndim", 0) >= 2)):
            if not floating or getattr(leaf, "ndim", 0) < 2:
                raise ValueError(f"quantize: {path}: a quantized leaf must be a floating array with at least 2 "
                                 f"dims, got {type(leaf).__name__} dtype={dtype} shape={getattr(leaf, 'shape', None)}")
            layout = resolve_layout(path, tuple(leaf.shape), layouts)
            q, finite = quantize_kernel_flagged(leaf, layout, config, dtype, path)
            out.append(q)
            flagged.append((path, leaf, layout, dtype, finite))
            hits += 1
        elif rest is not None and floating:
            out.append(leaf.astype(rest) if hasattr(leaf, "astype") else jnp.asarray(leaf, rest))
        else:
            out.append(leaf)
    if what is not None and not hits:
        raise ValueError(f"quantize: {what} match no parameter path; paths include: "
                         f"{', '.join(p for p, _ in leaves[:12])}")
    # every kernel's work is dispatched: fetch the finite flags in one transfer (none under jit)
    flagged = [f for f in flagged if not isinstance(f[4], jax.core.Tracer)]
    for (path, leaf, layout, dtype, _), ok in zip(flagged, jax.device_get([f[4] for f in flagged])):
        if not ok:
            _raise_not_finite_kernel(leaf, config, dtype, path)
    return jax.tree_util.tree_unflatten(treedef, out)
