"""Factored execution for Flax linen: adapters applied inside each layer, ``W0 + ΔW`` never formed.

:func:`apply` places each adapter's arrays *beside* the kernel they adapt in the ``params``
collection (``kernel__lowrank_a`` next to ``kernel``), so ``nn.scan``/``nn.remat``/``nn.vmap`` slice
and broadcast them exactly like the kernel, then runs ``model.apply`` under ``nn.intercept_methods``.
For every adapted ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` call the handler computes::

    y = layer(x)                                     # the layer's own code: dtype, precision, bias
    y = y + branch(dropout(x))                       # LoRA: s·(x@A)@B;  VeRA: ((x@A)⊙λ_d)@B⊙λ_b
    y = (m/‖W0 + s·A@B‖_col) ⊙ (y − bias + branch) + bias     # DoRA, norm without an (in,out) temp

For an NF4 kernel the handler computes the base product itself, dequantizing that one kernel inside
the layer (``nf4_matmul``: the backward re-dequantizes instead of keeping the weight alive).

A targeted kernel that no recognised layer consumes (a custom ``self.param`` + ``jnp.dot`` module,
``nn.Conv``, ``nn.Embed``) is merged inside the step instead, with one warning naming those paths.
Custom layers join the factored path through ``custom_layers={MyLayer: LayerSpec(...)}``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.execution import views
from lowrank_jax.layout import Layout
from lowrank_jax.tree import (
    BASE_SQ_NORMS,
    SHARED_KEY,
    _is_frozen_leaf,
    adapter_nodes,
    base_params,
    merge_leaf,
    path_str,
)

SEP = "__lowrank_"
# checkpoint_name of DoRA's pre-scale output x@W0 + s·(x@A)@B: its magnitude gradient needs it, so a
# remat policy that saves only layer outputs should also save this name, e.g.
# jax.checkpoint_policies.save_only_these_names("my_layer_out", lowrank_jax.DORA_PRE_SCALE).
DORA_PRE_SCALE = "lowrank_dora_pre_scale"
DROPOUT_KEY = "dropout_key"
BASE_SQ_NORM = "base_sq_norm"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How a layer class contracts its input with a kernel, for the factored path.

    Args:
      kind: ``"dense"`` (``y = x @ kernel (+ bias)``, kernel ``(in, out)``), ``"dense_general"``
        (contract the input axes ``axis`` with the leading kernel axes) or ``"einsum"``
        (``jnp.einsum(einsum_str, x, kernel)``).
      kernel: name of the kernel param in the module.
      bias: name of the bias param (added after the contraction), or ``None``.
      axis: for ``"dense_general"``: the contracted input axes, or the module attribute naming them.
      einsum_str: for ``"einsum"``: the einsum string, or the module attribute holding it.

    Example — a custom layer that does ``x @ self.param("w", ...)``:
      >>> lowrank_jax.apply(model, variables, adapter, x, custom_layers={MyDense: LayerSpec("dense", kernel="w")})
    """

    kind: str = "dense"
    kernel: str = "kernel"
    bias: str | None = "bias"
    axis: Any = "axis"
    einsum_str: str = "einsum_str"

    def __post_init__(self):
        if self.kind not in ("dense", "dense_general", "einsum"):
            raise ValueError(f"LayerSpec.kind must be 'dense', 'dense_general' or 'einsum', got {self.kind!r}")


BUILTIN_LAYERS: dict[type, LayerSpec] = {
    nn.Dense: LayerSpec("dense"),
    nn.DenseGeneral: LayerSpec("dense_general"),
    nn.Einsum: LayerSpec("einsum"),
}


def _spec_for(module: nn.Module, custom: Mapping[type, LayerSpec] | None) -> LayerSpec | None:
    for table in (custom or {}), BUILTIN_LAYERS:
        for cls, spec in table.items():
            if type(module) is cls:
                return spec
    for table in (custom or {}), BUILTIN_LAYERS:
        for cls, spec in table.items():
            if isinstance(module, cls):
                return spec
    return None


def _call_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    if "x" in kwargs:
        return kwargs["x"]
    raise TypeError("lowrank_jax: could not find the input of an adapted layer call")


def _view(module: nn.Module, spec: LayerSpec, args: tuple, kwargs: dict, x_shape, kernel_shape):
    if spec.kind == "dense":
        return views.dense_view(tuple(x_shape), tuple(kernel_shape))
    if spec.kind == "dense_general":
        if getattr(module, "batch_dims", ()) not in ((), None):
            return None
        axis = getattr(module, spec.axis) if isinstance(spec.axis, str) else spec.axis
        return views.dense_general_view(tuple(x_shape), tuple(kernel_shape), axis)
    einsum_str = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
    if einsum_str is None:
        einsum_str = getattr(module, spec.einsum_str) if isinstance(spec.einsum_str, str) and \
            hasattr(module, spec.einsum_str) else spec.einsum_str
    return views.einsum_view(einsum_str, tuple(x_shape), tuple(kernel_shape))


@dataclasses.dataclass(frozen=True)
class _Target:
    path: str
    node: AdapterParams
    quantized: bool


def _module_key(module: nn.Module, kernel: str) -> str:
    return "/".join(str(p) for p in module.path) + "/" + kernel


def _dropout(x, rate: float, key_data):
    """Inverted dropout of the adapter input: keep with probability ``1 − rate``, scale by ``1/(1 − rate)``."""
    if rate == 0.0 or key_data is None:
        return x
    key = jax.random.wrap_key_data(key_data)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _make_handler(targets: Mapping[str, _Target], shared: Mapping, consumed: set | None,
                  custom: Mapping[type, LayerSpec] | None, adapter_dtype: Any):
    def handler(next_fun: Callable, args: tuple, kwargs: dict, ctx: Any):
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = ctx.module
        spec = _spec_for(module, custom)
        if spec is None:
            return next_fun(*args, **kwargs)
        key = _module_key(module, spec.kernel)
        target = targets.get(key)
        if target is None:
            return next_fun(*args, **kwargs)
        node, method = target.node, target.node.method
        per_call_shape = node.shape[node.layout.stack:]
        x = _call_input(args, kwargs)
        view = _view(module, spec, args, kwargs, jnp.shape(x), per_call_shape)
        if view is None or view.layout.in_axes != node.layout.in_axes \
                or view.layout.out_axes != node.layout.out_axes:
            return next_fun(*args, **kwargs) if not target.quantized else _unsupported(key)
        if consumed is not None:
            consumed.add(key)
        params = {k: module.get_variable("params", spec.kernel + SEP + k) for k in node.params}
        key_data = module.get_variable("params", spec.kernel + SEP + DROPOUT_KEY) \
            if module.has_variable("params", spec.kernel + SEP + DROPOUT_KEY) else None
        sh = shared.get(node.shared) if node.shared else None
        kernel = module.get_variable("params", spec.kernel)
        has_bias = spec.bias is not None and module.has_variable("params", spec.bias)
        bias = module.get_variable("params", spec.bias) if has_bias else None

        xm = view.x_to_mat(x)
        if target.quantized:
            from lowrank_jax.quant import nf4
            cdt = method.quant.compute_dtype or node.dtype
            cdt = jnp.result_type(cdt, getattr(module, "dtype", None) or cdt)
            base_m = nf4.nf4_matmul(xm.astype(cdt), kernel)
            y = view.mat_to_y(base_m)
            if bias is not None:
                y = y + bias.astype(y.dtype)
        else:
            y = next_fun(*args, **kwargs)

        adt = adapter_dtype or jnp.result_type(*[p.dtype for p in params.values()])
        xa = _dropout(xm.astype(adt), method.dropout, key_data)
        branch_m = method.branch(xa, params, sh)

        if getattr(method, "detach_norm", None) is None:  # additive methods: LoRA, VeRA
            return y + view.mat_to_y(branch_m).astype(y.dtype)
        # DoRA: y = k ⊙ (x@W0 + branch) + bias, k = m / ‖W0 + s·A@B‖_col
        if target.quantized:
            from lowrank_jax.tree import _dequantize_matrix
            w_mat = _dequantize_matrix(kernel)
        else:
            w_mat = view.layout.to_matrix(kernel)
        cache_name = spec.kernel + SEP + BASE_SQ_NORM
        cache = module.get_variable("params", cache_name) if module.has_variable("params", cache_name) else None
        scale = method.output_scale(w_mat, params, cache)
        # in the (rows, out) matrix view: 2-D elementwise ops and reductions (cheaper for XLA than
        # broadcasting over several batch axes)
        y_nobias = y - bias.astype(y.dtype) if bias is not None else y
        pre = checkpoint_name(view.y_to_mat(y_nobias).astype(adt) + branch_m, DORA_PRE_SCALE)
        out = pre * scale.astype(adt)[None, :]
        out = view.mat_to_y(out)
        if bias is not None:
            out = out + bias.astype(adt)
        return out.astype(y.dtype)

    return handler


def _unsupported(key: str):
    raise NotImplementedError(
        f"{key}: this NF4-quantized kernel is used by a layer call the factored path cannot express "
        "(e.g. DenseGeneral with batch_dims); quantized kernels need a recognised layer"
    )


def _split_path(path: str) -> tuple[list[str], str]:
    parts = path.split("/")
    return parts[:-1], parts[-1]


def _colocate(base: Any, nodes: list[tuple[str, AdapterParams]], dropout_key: Any,
              norm_cache: Mapping[str, Any] | None = None) -> Any:
    """Copy of the params dict with each adapter's arrays (and frozen per-kernel extras) next to its kernel."""
    if not isinstance(base, Mapping):
        raise TypeError(f"apply: variables['params'] must be a mapping, got {type(base).__name__}")

    def copy(d):
        return {k: copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}

    out = copy(base)
    for path, node in nodes:
        mods, kname = _split_path(path)
        d = out
        for m in mods:
            d = d[m]
        for name, arr in node.params.items():
            d[kname + SEP + name] = arr
        if norm_cache and path in norm_cache:
            d[kname + SEP + BASE_SQ_NORM] = norm_cache[path]
        if dropout_key is not None and node.method.dropout > 0:
            stack = node.layout.stack_shape(node.shape)
            k = jax.random.fold_in(dropout_key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
            keys = jax.random.split(k, math.prod(stack)) if stack else k
            kd = jax.random.key_data(keys)
            d[kname + SEP + DROPOUT_KEY] = kd.reshape(*stack, *kd.shape[1:]) if stack else kd
    return out


def apply(model: nn.Module, variables: Mapping[str, Any], adapter: Any, *args,
          dropout_key: jax.Array | None = None, custom_layers: Mapping[type, LayerSpec] | None = None,
          adapter_dtype: Any = None, **kwargs) -> Any:
    """``model.apply`` on ``merge(frozen, adapter)`` — computed factored, layer by layer.

    Args:
      model: a linen module.
      variables: as for ``model.apply``; ``variables["params"]`` is the *frozen* tree from
        :func:`lowrank_jax.init` (other collections pass through).
      adapter: the adapter tree (or ``None``/``{}`` for the base model).
      *args, **kwargs: forwarded to ``model.apply`` (``rngs``, ``method``, ``mutable``, ...).
      dropout_key: PRNG key for adapter dropout (only the adapter branch's input is dropped); with
        ``None`` no dropout is applied (evaluation).
      custom_layers: ``{LayerClass: LayerSpec(...)}`` opting custom layers into the factored path.
      adapter_dtype: dtype of the adapter branch's two thin matmuls (default: the adapter arrays'
        dtype, float32, as PEFT does); the branch is cast to the layer's output dtype.

    Returns:
      What ``model.apply`` returns. Call it inside your jitted function: the interception is entered
      while tracing, so a jit cache can never hold a trace without (or with another) adapter.
    """
    if "params" not in variables:
        raise KeyError("apply: variables must contain 'params' (the frozen tree from lowrank_jax.init)")
    frozen = variables["params"]
    shared = frozen.get(SHARED_KEY, {}) if isinstance(frozen, Mapping) else {}
    base = base_params(frozen)
    nodes = adapter_nodes(adapter) if adapter else []
    if not nodes:
        return model.apply({**variables, "params": base}, *args, **kwargs)

    leaves = dict((path_str(p), v) for p, v in jax.tree_util.tree_flatten_with_path(
        base, is_leaf=_is_frozen_leaf)[0])
    targets: dict[str, _Target] = {}
    for path, node in nodes:
        if path not in leaves:
            raise ValueError(f"apply: adapter path {path!r} is not in the frozen params")
        targets[path] = _Target(path, node, _is_frozen_leaf(leaves[path]))

    def run(nodes_now, base_now, consumed):
        params = _colocate(base_now, nodes_now, dropout_key, shared.get(BASE_SQ_NORMS))
        live = {k: v for k, v in targets.items() if any(p == k for p, _ in nodes_now)}
        handler = _make_handler(live, shared, consumed, custom_layers, adapter_dtype)
        with nn.intercept_methods(handler):
            return model.apply({**variables, "params": params}, *args, **kwargs)

    consumed: set = set()
    jax.eval_shape(lambda: run(nodes, base, consumed))
    missing = [p for p in targets if p not in consumed]
    if not missing:
        return run(nodes, base, None)

    warnings.warn(
        "lowrank_jax.apply: these adapted kernels are not consumed by a recognised layer "
        f"(nn.Dense/DenseGeneral/Einsum or custom_layers) and are merged inside the step instead: {missing}",
        stacklevel=2,
    )
    for path in missing:
        if targets[path].quantized:
            _unsupported(path)
    merged_base = _replace_leaves(base, {p: merge_leaf(leaves[p], targets[p].node, shared, p) for p in missing})
    kept = [(p, n) for p, n in nodes if p not in missing]
    return run(kept, merged_base, None)


def _replace_leaves(tree: Any, new: Mapping[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_frozen_leaf)
    return jax.tree_util.tree_unflatten(treedef, [new.get(path_str(p), v) for p, v in leaves])


def discover(model: nn.Module, variables: Mapping[str, Any], *args,
             custom_layers: Mapping[type, LayerSpec] | None = None, **kwargs) -> dict[str, Layout]:
    """Find each kernel's :class:`Layout` by a shape-only probe of one ``model.apply`` call.

    Runs ``jax.eval_shape`` of ``model.apply(variables, *args, **kwargs)`` with an interceptor that
    records, for every ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` (and ``custom_layers``) call, the
    kernel's path, which of its axes the input contracts (``in``) and which it produces (``out``).
    Leading axes the params tree has beyond the per-call kernel (``nn.scan``/``nn.vmap`` stacks) become
    ``Layout.stack``. Nothing is computed and nothing is guessed from names.

    Returns:
      ``{path: Layout}`` for every recognised kernel, to pass as ``init(..., layouts=...)``.
    """
    found: dict[str, tuple[Layout, tuple[int, ...]]] = {}

    def handler(next_fun, a, kw, ctx):
        module = ctx.module
        spec = _spec_for(module, custom_layers) if ctx.method_name == "__call__" else None
        if spec is not None and module.has_variable("params", spec.kernel):
            kernel = module.get_variable("params", spec.kernel)
            x = _call_input(a, kw)
            view = _view(module, spec, a, kw, jnp.shape(x), jnp.shape(kernel))
            if view is not None:
                found[_module_key(module, spec.kernel)] = (view.layout, tuple(jnp.shape(kernel)))
        return next_fun(*a, **kw)

    def probe():
        with nn.intercept_methods(handler):
            return model.apply(variables, *args, **kwargs)

    jax.eval_shape(probe)
    full = {path_str(p): tuple(jnp.shape(v)) for p, v in
            jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    out: dict[str, Layout] = {}
    for path, (layout, call_shape) in found.items():
        if path not in full:
            continue
        stack = len(full[path]) - len(call_shape)
        out[path] = Layout(layout.in_axes, layout.out_axes, stack)
    return out
