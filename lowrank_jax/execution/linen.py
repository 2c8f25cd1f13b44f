"""Factored execution for Flax linen: adapters applied inside each layer, ``W0 + ΔW`` never formed.

:func:`apply` places each adapter's arrays *beside* the kernel they adapt in the ``params``
collection (``kernel__lowrank_a`` next to ``kernel``), so ``nn.scan``/``nn.remat``/``nn.vmap`` slice
and broadcast them exactly like the kernel, then runs ``model.apply`` under ``nn.intercept_methods``.
For every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` call whose kernel is adapted or NF4 the
handler only locates the input, kernel and bias and calls
:func:`lowrank_jax.execution.factored.layer_output`, which runs the layer's own code (or, for an NF4
kernel, dequantizes that one kernel inside the layer) and the method's own ``forward``.

A targeted (or NF4) kernel that no recognised layer consumes (a custom ``self.param`` + ``jnp.dot``
module, ``nn.Conv``, ``nn.Embed``) is merged (dequantized) inside the step instead, with one warning
naming those paths. Custom layers join the factored path through ``custom_layers={MyLayer: LayerSpec(...)}``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.execution import views
from lowrank_jax.execution.factored import LayerCall, dropout_key_data, layer_output
from lowrank_jax.layout import Layout
from lowrank_jax.methods.lora import DORA_PRE_SCALE
from lowrank_jax.quant.kernels import is_quantized, kernel_of, kernel_shape_of
from lowrank_jax.stacking import check_adapter_ids
from lowrank_jax.tree import base_params, fitted_nodes, frozen_caches, merge_leaf, path_str, shared_of

__all__ = ["DORA_PRE_SCALE", "LayerSpec", "apply", "discover"]

SEP = "__lowrank_"
DROPOUT_KEY = "dropout_key"
CACHE = "frozen_cache"


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
      >>> import jax, jax.numpy as jnp, flax.linen as nn, lowrank_jax as lj
      >>> class MyDense(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 3))
      >>> model, x = MyDense(), jnp.ones((2, 4))
      >>> frozen, adapter = lj.init(lj.LoRA(rank=1, targets="w"), model.init(jax.random.key(0), x)["params"],
      ...                           jax.random.key(1))
      >>> lj.apply(model, {"params": frozen}, adapter, x, custom_layers={MyDense: LayerSpec("dense", kernel="w")}).shape
      (2, 3)
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


def _call_input(args: tuple, kwargs: dict, where: str) -> Any:
    if args:
        return args[0]
    for name in ("inputs", "x"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError(f"lowrank_jax.apply: {where}: could not find the layer call's input (no positional argument, "
                    f"no 'inputs' or 'x' keyword; got keywords {sorted(kwargs)})")


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
    node: AdapterParams | None      # None: an NF4 kernel without an adapter


def _module_key(module: nn.Module, kernel: str) -> str:
    return "/".join(str(p) for p in module.path) + "/" + kernel


def _make_handler(targets: Mapping[str, _Target], shared: Mapping, consumed: set | None,
                  custom: Mapping[type, LayerSpec] | None, adapter_dtype: Any, adapter_ids: Any = None):
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
        kernel = module.get_variable("params", spec.kernel)
        node = target.node
        x = _call_input(args, kwargs, key)
        per_call = node.shape[node.layout.stack:] if node is not None else kernel_shape_of(kernel)
        view = _view(module, spec, args, kwargs, jnp.shape(x), per_call)
        layout = node.layout if node is not None else kernel.kernel_layout or Layout()
        if view is None or view.layout.in_axes != layout.in_axes or view.layout.out_axes != layout.out_axes:
            return next_fun(*args, **kwargs)        # not consumed: merged/dequantized in the step instead
        if consumed is not None:
            consumed.add(key)

        def get(name):
            return module.get_variable("params", spec.kernel + SEP + name) \
                if module.has_variable("params", spec.kernel + SEP + name) else None

        has_bias = spec.bias is not None and module.has_variable("params", spec.bias)
        call = LayerCall(key, view, x, kernel, module.get_variable("params", spec.bias) if has_bias else None,
                         lambda: next_fun(*args, **kwargs), getattr(module, "dtype", None))
        if node is None:
            return layer_output(call, None)
        return layer_output(call, node, {k: get(k) for k in node.params},
                            shared=shared.get(node.shared) if node.shared else None, cache=get(CACHE),
                            dropout_key=get(DROPOUT_KEY), adapter_dtype=adapter_dtype, adapter_ids=adapter_ids)

    return handler


def _split_path(path: str) -> tuple[list[str], str]:
    parts = path.split("/")
    return parts[:-1], parts[-1]


def _colocate(base: Any, nodes: list[tuple[str, AdapterParams]], dropout_key: Any,
              caches: Mapping[str, Any]) -> Any:
    """Copy of the params dict with each adapter's arrays (and its frozen cache, dropout keys) next to its kernel."""
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
        if path in caches:
            d[kname + SEP + CACHE] = caches[path]
        if dropout_key is not None and node.method.dropout > 0:
            d[kname + SEP + DROPOUT_KEY] = dropout_key_data(dropout_key, path, node)
    return out


def apply(model: nn.Module, variables: Mapping[str, Any], adapter: Any, *args,
          dropout_key: jax.Array | None = None, custom_layers: Mapping[type, LayerSpec] | None = None,
          adapter_dtype: Any = None, adapter_ids: Any = None, **kwargs) -> Any:
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
      adapter_ids: for a stacked adapter (:func:`lowrank_jax.stack`): ``(B,)`` ints, example ``b`` runs
        with adapter ``adapter_ids[b]`` (``-1``: the base); every adapted layer's input must have the
        batch ``B`` as its leading axis.

    Returns:
      What ``model.apply`` returns. Call it inside your jitted function: the interception is entered
      while tracing, so a jit cache can never hold a trace without (or with another) adapter.

    The model runs once. A targeted kernel that no recognised layer consumes (a custom layer not in
    ``custom_layers``) is found in that run; the model then runs a second time with that kernel merged
    (NF4: dequantized) and a warning names it — under ``jit`` the first run is dead code, but effects in
    the model (``jax.debug.callback``/``print``) fire in both runs.
    """
    if "params" not in variables:
        raise KeyError("apply: variables must contain 'params' (the frozen tree from lowrank_jax.init)")
    frozen = variables["params"]
    shared = shared_of(frozen)
    base = base_params(frozen)
    nodes, leaves = fitted_nodes(frozen, adapter, "apply")
    adapter_ids = check_adapter_ids(adapter, adapter_ids, "apply")
    caches = frozen_caches(frozen)
    node_of = dict(nodes)
    targets = {p: _Target(p, node_of.get(p)) for p, leaf in leaves.items() if p in node_of or is_quantized(leaf)}
    if not targets:
        return model.apply({**variables, "params": base}, *args, **kwargs)

    def run(nodes_now, base_now, consumed, skip=()):
        params = _colocate(base_now, nodes_now, dropout_key, caches)
        live = {k: v for k, v in targets.items() if k not in skip}
        handler = _make_handler(live, shared, consumed, custom_layers, adapter_dtype, adapter_ids)
        with nn.intercept_methods(handler):
            return model.apply({**variables, "params": params}, *args, **kwargs)

    # One trace that also records which targets a recognised layer consumed: the common case (all of
    # them) returns it as is; otherwise its result is dropped (dead code under jit) and the model is
    # run again with the unconsumed kernels merged -- so in that case the model runs twice, and any
    # jax.debug.callback/print inside it fires twice.
    consumed: set = set()
    out = run(nodes, base, consumed)
    missing = [p for p in targets if p not in consumed]
    if not missing:
        return out
    del out

    warnings.warn(
        "lowrank_jax.apply: these adapted or NF4 kernels are not consumed by a recognised layer "
        f"(nn.Dense/DenseGeneral/Einsum or custom_layers; finding them ran the model twice) and are merged "
        f"(NF4: dequantized) inside the step instead: {missing}", stacklevel=2,
    )
    merged = {p: merge_leaf(leaves[p], node_of[p], shared, p) if p in node_of else kernel_of(leaves[p])
              for p in missing}
    kept = [(p, n) for p, n in nodes if p not in missing]
    return run(kept, _replace_leaves(base, merged), None, set(missing))


def _shape(kernel: Any) -> tuple[int, ...]:
    return kernel_shape_of(kernel) if is_quantized(kernel) else tuple(jnp.shape(kernel))


def _replace_leaves(tree: Any, new: Mapping[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
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
            key = _module_key(module, spec.kernel)
            x = _call_input(a, kw, key)
            view = _view(module, spec, a, kw, jnp.shape(x), _shape(kernel))
            if view is not None:
                found[key] = (view.layout, _shape(kernel))
        return next_fun(*a, **kw)

    def probe():
        with nn.intercept_methods(handler):
            return model.apply(variables, *args, **kwargs)

    jax.eval_shape(probe)
    full = {path_str(p): _shape(v) for p, v in
            jax.tree_util.tree_flatten_with_path(base_params(variables["params"]), is_leaf=is_quantized)[0]}
    out: dict[str, Layout] = {}
    for path, (layout, call_shape) in found.items():
        if path not in full:
            continue
        stack = len(full[path]) - len(call_shape)
        out[path] = Layout(layout.in_axes, layout.out_axes, stack)
    return out
