"""The one layer-level factored computation that the linen and the NNX execution paths both call.

An execution path only *locates* a layer call: its input ``x``, its (per-layer) kernel, its bias,
the :class:`~lowrank_jax.execution.views.CallView` that maps them to matrices, and a thunk running
the layer's own code. :func:`layer_output` then computes, in the matrix view ``(rows, out)``::

    y = layer(x)                                  # the layer's own code (dtype, precision, bias)
    y = nf4_matmul(x, q) + bias                   # instead, for an NF4 kernel (dequantized here,
                                                  #   re-dequantized in the backward, one layer alive)
    y = method.forward(dropout(x), y, bias, arrays, FrozenInputs(kernel, shared, cache))

so each method's factored math lives in its own module only (:meth:`forward`), and a quantized
kernel without an adapter costs one dequantization inside its own layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.execution.views import CallView
from lowrank_jax.methods.base import FrozenInputs
from lowrank_jax.methods.stacked import is_stacked, rows_per_example
from lowrank_jax.quant import nf4
from lowrank_jax.quant.kernels import is_quantized, matrix_of

Array = jax.Array


def dropout(x: Array, rate: float, key_data: Array | None) -> Array:
    """Inverted dropout of the adapter input: keep with probability ``1 − rate``, scale by ``1/(1 − rate)``."""
    if rate == 0.0 or key_data is None:
        return x
    key = jax.random.wrap_key_data(key_data)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dropout_key_data(dropout_key: Array, path: str, node: AdapterParams) -> Array:
    """Per-kernel (and per stacked layer) dropout key data: ``fold_in(key, crc32(path))`` split over the stack."""
    stack = node.layout.stack_shape(node.shape)
    k = jax.random.fold_in(dropout_key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    keys = jax.random.split(k, math.prod(stack)) if stack else k
    kd = jax.random.key_data(keys)
    return kd.reshape(*stack, *kd.shape[1:]) if stack else kd


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One located layer call.

    Attributes:
      path: the kernel's param path (for errors).
      view: how ``x`` and the output map to ``x_mat @ W_mat = y_mat``.
      x: the layer's input.
      kernel: the per-layer kernel as the layer sees it (an ``NF4Array`` when quantized).
      bias: the layer's bias param (over its output axes, output order), or ``None``.
      base: runs the layer's own code (used only when the kernel is not quantized).
      module_dtype: the layer's ``dtype`` attribute (computation dtype), or ``None``.
    """

    path: str
    view: CallView
    x: Any
    kernel: Any
    bias: Any
    base: Callable[[], Array]
    module_dtype: Any = None


def check_view(path: str, view: CallView | None, layout: Any, what: str) -> None:
    """Raise naming ``path`` when a call contracts the kernel differently from ``layout``."""
    if view is None or view.layout.in_axes != layout.in_axes or view.layout.out_axes != layout.out_axes:
        got = None if view is None else view.layout
        raise NotImplementedError(
            f"lowrank_jax: {path}: this layer call contracts its kernel as {got}, not as the {what}'s layout "
            f"(in_axes={layout.in_axes}, out_axes={layout.out_axes}); the factored path cannot express it")


def _base_nf4(call: LayerCall, xm: Array, bias_m: Array | None) -> Array:
    q = call.kernel
    check_view(call.path, call.view, q.kernel_layout or _matrix_layout(), "NF4 kernel")
    cdt = q.compute_dtype or q.dtype
    if call.module_dtype is not None:
        cdt = jnp.result_type(cdt, call.module_dtype)
    y = nf4.nf4_matmul(xm.astype(cdt), q)
    return y if bias_m is None else y + bias_m.astype(y.dtype)


def _matrix_layout():
    from lowrank_jax.layout import Layout
    return Layout()


def layer_output(call: LayerCall, node: AdapterParams | None, arrays: Mapping[str, Array] | None = None, *,
                 shared: Mapping[str, Array] | None = None, cache: Array | None = None,
                 dropout_key: Array | None = None, adapter_dtype: Any = None,
                 adapter_ids: Array | None = None) -> Array:
    """The layer's output with ``node``'s adapter applied factored (or none: ``node=None``).

    ``arrays`` are the per-layer trainable arrays (sliced by scan/vmap as the kernel is), ``shared``
    the method's shared frozen arrays, ``cache`` its per-kernel frozen cache, ``dropout_key`` the
    per-layer key data of the adapter-input dropout. For a stacked node (:func:`lowrank_jax.stack`)
    ``adapter_ids (B,)`` gives each example's adapter; the input's leading axis must be that batch.
    """
    view = call.view
    quantized = is_quantized(call.kernel)
    if node is None and not quantized:
        return call.base()
    xm = view.x_to_mat(call.x)
    bias_m = view.bias_to_mat(call.bias) if call.bias is not None else None
    if quantized:
        y_m = _base_nf4(call, xm, bias_m)
        if node is None:
            return view.mat_to_y(y_m)
    else:
        y_m = view.y_to_mat(call.base())
    check_view(call.path, view, node.layout, "adapter")
    method = node.method
    adt = adapter_dtype or jnp.result_type(*[a.dtype for a in arrays.values()])
    layout = None if quantized else view.layout
    if is_stacked(method) or adapter_ids is not None:
        frozen = _frozen_inputs(layout, call.kernel, shared, cache)
        return view.mat_to_y(_stacked_output(call, node, xm.astype(adt), y_m, bias_m, arrays, frozen,
                                             dropout_key, adapter_ids))
    xa = dropout(xm.astype(adt), method.dropout, dropout_key)
    try:
        hash(method)
    except TypeError:   # a user's method value that cannot be a static jit argument: traced per layer
        return view.mat_to_y(method.forward(xa, y_m, bias_m, dict(arrays), _frozen_inputs(layout, call.kernel, shared,
                                                                                         cache)))
    return view.mat_to_y(_method_forward(method, layout, xa, y_m, bias_m, dict(arrays), call.kernel, shared, cache))


def _frozen_inputs(layout: Any, kernel: Any, shared: Any, cache: Any) -> FrozenInputs:
    """``W0`` as a float32 matrix on demand: dequantized (``layout is None``: NF4) or the layout's view."""
    return FrozenInputs(
        kernel=(lambda: matrix_of(kernel)) if layout is None else (lambda: layout.to_matrix(kernel).astype(jnp.float32)),
        shared=shared, cache=cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _method_forward(method: Any, layout: Any, xa: Array, y_m: Array, bias_m: Array | None,
                    arrays: dict[str, Array], kernel: Any, shared: Any, cache: Any) -> Array:
    """``method.forward`` on one layer's matrices, as a nested ``jit``: layers with the same method, shapes
    and dtypes share one trace (and its autodiff), which cuts the step's lowering time; XLA inlines the
    calls, so the compiled program is the one an un-nested forward gives."""
    return method.forward(xa, y_m, bias_m, arrays, _frozen_inputs(layout, kernel, shared, cache))


def _stacked_output(call: LayerCall, node: AdapterParams, xm: Array, y_m: Array, bias_m: Array | None,
                    arrays: Mapping[str, Array], frozen: FrozenInputs, dropout_key: Array | None,
                    adapter_ids: Array | None) -> Array:
    """A stacked node's output: each example's rows with its own adapter (:class:`Stacked`)."""
    if not is_stacked(node.method) or adapter_ids is None:
        raise ValueError(f"lowrank_jax.apply: {call.path}: adapter_ids go with a stacked adapter "
                         "(lowrank_jax.stack) and a stacked adapter needs adapter_ids")
    rows_per_example(call.path, call.view, adapter_ids.shape[0])
    xa = node.method.input_dropout(xm, dropout_key, adapter_ids)
    return node.method.forward(xa, y_m, bias_m, dict(arrays), frozen, ids=adapter_ids)
