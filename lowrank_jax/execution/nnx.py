"""Factored execution for Flax NNX: adapters applied inside ``nnx.Linear``/``LinearGeneral``/``Einsum``.

NNX has no method interceptor, so :func:`apply` works on a *throwaway copy* of the model, built
functionally inside whatever trace is running (``jax.jit``, ``jax.grad``, ...)::

    graphdef, state = nnx.split(model)           # the user's model is only read
    state  ← frozen params (+ fresh copies of every other variable)
    copy   = nnx.merge(graphdef, state)
    for each adapted layer of the copy:
        layer.kernel__lowrank_a = LowRankParam(A)   # beside the kernel, same leading stack axes
        layer.__class__ = LowRank<Linear|LinearGeneral|Einsum>   # factored __call__
    return copy(*args, **kwargs)

The adapter arrays are NNX variables of the layer that owns the kernel, so ``nnx.scan`` over
``nnx.vmap``-created layers slices them exactly like the kernel and ``nnx.remat`` carries them as
state; :class:`LowRankParam` subclasses ``nnx.Param`` so ``nnx.StateAxes({nnx.Param: 0, ...})``
filters match them too. The factored ``__call__`` computes (same math as the linen path)::

    y = layer(x)                                      # the layer's own code: dtype, precision, bias
    y = y + branch(dropout(x))                        # LoRA s·(x@A)@B;  VeRA ((x@A)⊙λ_d)@B⊙λ_b
    y = (m/‖W0 + s·A@B‖_col) ⊙ (y − bias + branch) + bias      # DoRA, no (in, out) temporary

and for an NF4 frozen kernel (QLoRA) the base product ``nf4_matmul(x_mat, q)`` (per layer, inside
the scan/remat body). VeRA's shared frozen projections are not per-layer state: they are read from a
context variable that :func:`apply` sets while the model runs (scan/remat bodies close over them).

Every variable of the copy is created in the current trace, so a plain ``jax.grad`` over the adapter
argument works also for ``nnx.scan`` models (no "different trace level" error, flax #4771), and the
user's model (its variables, classes and attributes) is never modified.

Paths are the ``/``-joined keys of ``nnx.state(model, nnx.Param)`` (``blocks/0/attn/query/kernel``,
no ``.value``); :func:`params_of` returns exactly that tree as nested dicts of arrays, ready for
:func:`lowrank_jax.init`, and :func:`discover` finds the layouts (multi-axis kernels, ``nnx.vmap``
stacks) from the layers' configuration, without running the model.
"""

from __future__ import annotations

import contextvars
import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.execution import views
from lowrank_jax.execution.factored import LayerCall, check_view, dropout_key_data, layer_output
from lowrank_jax.layout import Layout
from lowrank_jax.quant.kernels import is_quantized, kernel_of, kernel_shape_of, layout_of
from lowrank_jax.stacking import check_adapter_ids
from lowrank_jax.tree import base_params, fitted_nodes, frozen_caches, merge_leaf, shared_of

__all__ = ["LowRankParam", "apply", "discover", "factored_model", "merged_model", "params_of", "shared_scope"]

SEP = "__lowrank_"
DROPOUT_KEY = "dropout_key"
CACHE = "frozen_cache"

_SHARED: contextvars.ContextVar[Mapping | None] = contextvars.ContextVar("lowrank_jax_nnx_shared",
                                                                        default=None)
_ADAPTER_IDS: contextvars.ContextVar[Any] = contextvars.ContextVar("lowrank_jax_nnx_adapter_ids", default=None)


class LowRankParam(nnx.Param):
    """An adapter array (or per-layer dropout key data) attached to an adapted layer by :func:`apply`.

    A subclass of ``nnx.Param``: filters and ``nnx.StateAxes`` written for ``nnx.Param`` treat it as
    the kernel is treated (sliced by ``nnx.scan``, carried by ``nnx.remat``).
    """


# --------------------------------------------------------------------------------- layer kinds

_KINDS: tuple[tuple[type, str], ...] = (
    (nnx.Linear, "linear"),
    (nnx.LinearGeneral, "linear_general"),
    (nnx.Einsum, "einsum"),
)


def _kind_of(module: Any) -> str | None:
    """``"linear"``/``"linear_general"``/``"einsum"`` for a recognised layer (a subclass counts only
    when it keeps the base class's ``__call__``), else ``None``."""
    module_type = type(module).__dict__.get("_lowrank_base", type(module))
    for cls, kind in _KINDS:
        if module_type is cls or (issubclass(module_type, cls) and module_type.__call__ is cls.__call__):
            return kind
    return None


def _einsum_static_layout(einsum_str: str | None) -> Layout | None:
    if not einsum_str:
        return None
    xs = einsum_str.replace(" ", "").split("->")[0].split(",")[0]
    x_ndim = len(xs.replace("...", "")) + (1 if "..." in xs else 0)
    try:
        return views.einsum_layout(einsum_str, x_ndim)
    except ValueError:
        return None


def _layer_layout(module: Any, kind: str) -> tuple[Layout, int] | None:
    """Per-call kernel layout (``stack=0``) and per-call kernel rank, from the layer's config."""
    if kind == "linear":
        return Layout(), 2
    if kind == "linear_general":
        if module.batch_axis:
            return None
        n_in, n_out = len(module.in_features), len(module.out_features)
        return Layout(tuple(range(n_in)), tuple(range(n_in, n_in + n_out))), n_in + n_out
    layout = _einsum_static_layout(module.einsum_str)
    if layout is None:
        return None
    return layout, len(layout.in_axes) + len(layout.out_axes)


def _mod_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _kernel_value(var: Any) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


# ----------------------------------------------------------------------------- public helpers

def params_of(model: nnx.Module) -> dict:
    """``nnx.state(model, nnx.Param)`` as nested plain dicts of arrays (keys as in the state: attribute
    names, ``int`` indices of ``nnx.List``), i.e. the ``params`` to pass to :func:`lowrank_jax.init`.
    Its ``/``-joined paths (``blocks/0/lin/kernel``) are the paths used by targets and layouts."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def discover(model: nnx.Module) -> dict[str, Layout]:
    """``{kernel path: Layout}`` for every ``nnx.Linear``/``LinearGeneral``/``Einsum`` of ``model``.

    A static walk of the module graph: ``in``/``out`` axes come from each layer's configuration
    (``Linear``: ``(in, out)``; ``LinearGeneral``: ``(*in_features, *out_features)``; ``Einsum``: its
    ``einsum_str``), and ``stack`` is the number of leading axes the stored kernel has beyond the
    per-layer kernel (layers created under ``nnx.vmap``, e.g. for ``nnx.scan`` over layers).
    Skipped: ``LinearGeneral`` with ``batch_axis`` and ``Einsum`` whose string is only given at call
    time or is not a plain contraction (pass ``layouts=`` for those yourself if they are targeted).
    """
    out: dict[str, Layout] = {}
    for path, node in nnx.iter_graph(model):
        kind = _kind_of(node)
        if kind is None:
            continue
        found = _layer_layout(node, kind)
        kernel = getattr(node, "kernel", None)
        if found is None or not isinstance(kernel, nnx.Variable):
            continue
        layout, ndim = found
        value = _kernel_value(kernel)
        if is_quantized(value) or not hasattr(value, "ndim"):
            continue
        stack = value.ndim - ndim
        if stack < 0:
            continue
        out[_mod_path(path) + "/kernel"] = Layout(layout.in_axes, layout.out_axes, stack)
    return out


# ------------------------------------------------------------------------------ factored layer

@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one factored layer (part of the copy's graphdef, hashable)."""

    path: str
    kind: str
    node_aux: tuple | None            # AdapterParams.aux of the adapter; None: an NF4 kernel without one
    kernel_shape: tuple[int, ...]     # per-call kernel shape
    cached: bool
    dropout: bool
    adapter_dtype: Any


def _call_input(args: tuple, kwargs: dict, where: str) -> tuple[Any, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    if "inputs" in kwargs:
        kw = dict(kwargs)
        return kw.pop("inputs"), (), kw
    raise TypeError(f"lowrank_jax.nnx.apply: {where}: could not find the layer call's input (no positional "
                    f"argument, no 'inputs' keyword; got keywords {sorted(kwargs)})")


def _view(module: Any, spec: _Spec, x_shape: tuple[int, ...], rest: tuple, kwargs: dict):
    if spec.kind == "linear":
        return views.dense_view(x_shape, spec.kernel_shape)
    if spec.kind == "linear_general":
        nd = len(x_shape)
        axis = tuple(sorted(a % nd for a in module.axis))     # nnx.LinearGeneral sorts its axes
        return views.dense_general_view(x_shape, spec.kernel_shape, axis)
    einsum_str = kwargs.get("einsum_str") or (rest[0] if rest else None) or module.einsum_str
    return views.einsum_view(einsum_str.replace(" ", ""), x_shape, spec.kernel_shape)


def _factored_call(module: Any, base_call: Callable, args: tuple, kwargs: dict):
    spec: _Spec = module._lowrank_spec
    node = None if spec.node_aux is None else \
        AdapterParams.tree_unflatten(spec.node_aux, [getattr(module, "kernel" + SEP + k)[...] for k in spec.node_aux[0]])
    x, rest, kw = _call_input(args, kwargs, spec.path)
    x = jnp.asarray(x)
    view = _view(module, spec, tuple(x.shape), rest, kw)
    kernel = _kernel_value(module.kernel)
    check_view(spec.path, view, node.layout if node is not None else kernel.kernel_layout or Layout(),
               "adapter" if node is not None else "NF4 kernel")
    bias = module.bias[...] if getattr(module, "bias", None) is not None else None
    call = LayerCall(spec.path, view, x, kernel, bias, lambda: base_call(*args, **kwargs),
                     getattr(module, "dtype", None))
    if node is None:
        return layer_output(call, None)
    shared_all = _SHARED.get() or {}
    sh = shared_all.get(node.shared) if node.shared else None
    if node.shared and sh is None:
        raise RuntimeError(f"lowrank_jax.nnx: {spec.path}: the shared arrays {node.shared!r} "
                           "are only available while lowrank_jax.execution.nnx.apply runs the model")
    kname = "kernel"
    return layer_output(
        call, node, node.params, shared=sh,
        cache=getattr(module, kname + SEP + CACHE)[...] if spec.cached else None,
        dropout_key=getattr(module, kname + SEP + DROPOUT_KEY)[...] if spec.dropout else None,
        adapter_dtype=spec.adapter_dtype, adapter_ids=_ADAPTER_IDS.get())


_FACTORED_CLASSES: dict[type, type] = {}


def _factored_class(cls: type) -> type:
    """``LowRank<cls>``: a direct subclass of ``cls`` (same object layout, so the class of a module
    copy can be swapped) whose ``__call__`` runs :func:`_factored_call` around ``cls.__call__``."""
    if cls not in _FACTORED_CLASSES:
        def __call__(self, *args, **kwargs):
            return _factored_call(self, lambda *a, **k: cls.__call__(self, *a, **k), args, kwargs)

        name = f"LowRank{cls.__name__}"
        __call__.__qualname__ = f"{name}.__call__"
        _FACTORED_CLASSES[cls] = type(name, (cls,), {
            "__module__": __name__, "__qualname__": name, "__call__": __call__,
            "_lowrank_base": cls,
        })
    return _FACTORED_CLASSES[cls]


# ------------------------------------------------------------------------------------ building

def _fresh_state(model: nnx.Module, frozen_flat: Mapping[str, Any], replaced: Mapping[str, Any]):
    """``(graphdef, state)`` of ``model`` with frozen params swapped in and every variable a new
    object created in the current trace (the model's own variables are never reused)."""
    graphdef, state = nnx.split(model)
    flat = []
    seen = set()
    for path, var in nnx.to_flat_state(state):
        key = _mod_path(path)
        if isinstance(var, nnx.Param) and key in frozen_flat:
            seen.add(key)
            value = replaced.get(key, frozen_flat[key])
            flat.append((path, var.replace(value)))
        else:
            flat.append((path, var.replace(var.get_value() if hasattr(var, "get_value") else var.value)))
    extra = [p for p in frozen_flat if p not in seen]
    if extra:
        raise ValueError(f"lowrank_jax.nnx: frozen paths not among the model's nnx.Param paths: {extra[:8]}"
                         f"{' …' if len(extra) > 8 else ''}")
    return graphdef, nnx.from_flat_state(flat)


def factored_model(model: nnx.Module, frozen: Any, adapter: Any, *, dropout_key: jax.Array | None = None,
                   adapter_dtype: Any = None) -> tuple[nnx.Module, Mapping]:
    """``(copy, shared)``: a new module equal to ``model`` with ``frozen`` params, whose adapted and
    NF4 layers run factored, and the shared frozen arrays (VeRA) the copy's layers read while it runs.

    Call the copy inside ``with shared_scope(shared): copy(x)`` (VeRA layers read the shared
    projections from it) — or just use :func:`apply`, which does exactly that. Build it inside your
    traced function (jit/grad): its variables are created in the current trace. Targeted (or NF4)
    kernels no recognised layer owns are merged (dequantized) into the copy's params, with one warning
    listing them. Runs the same fit checks as :func:`lowrank_jax.merge`.
    """
    shared = shared_of(frozen)
    nodes, frozen_flat = fitted_nodes(frozen, adapter, "lowrank_jax.nnx.apply")
    node_of = dict(nodes)
    caches = frozen_caches(frozen)
    wanted = [p for p in frozen_flat if p in node_of or is_quantized(frozen_flat[p])]

    # Which targets a recognised layer owns (static walk of the user's model; nothing is mutated).
    layers: dict[str, tuple[Any, str]] = {}
    for mpath, mod in nnx.iter_graph(model):
        kind = _kind_of(mod)
        if kind is not None:
            layers[_mod_path(mpath) + "/kernel"] = (mod, kind)
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    missing = []
    for path in wanted:
        node, leaf = node_of.get(path), frozen_flat[path]
        layout = node.layout if node is not None else layout_of(leaf)
        shape = node.shape if node is not None else kernel_shape_of(leaf)
        hit = layers.get(path)
        found = _layer_layout(hit[0], hit[1]) if hit else None
        if hit is not None and found is None and hit[1] == "einsum" and not hit[0].einsum_str:
            found = (Layout(layout.in_axes, layout.out_axes), layout.ndim - layout.stack)
        if found is None or found[0].in_axes != layout.in_axes or found[0].out_axes != layout.out_axes:
            missing.append(path)
            continue
        plan[path] = (hit[1], tuple(shape[layout.stack:]))

    replaced = {}
    if missing:
        warnings.warn(
            "lowrank_jax.nnx.apply: these adapted or NF4 kernels are not owned by a recognised layer "
            "(nnx.Linear/LinearGeneral/Einsum with a matching layout) and are merged (NF4: dequantized) inside "
            f"the step instead: {missing}", stacklevel=3)
        replaced = {p: merge_leaf(frozen_flat[p], node_of[p], shared, p) if p in node_of else kernel_of(frozen_flat[p])
                    for p in missing}

    graphdef, state = _fresh_state(model, frozen_flat, replaced)
    copy = nnx.merge(graphdef, state)
    modules = {_mod_path(p) + "/kernel": m for p, m in nnx.iter_graph(copy) if _kind_of(m) is not None}
    for path, (kind, kernel_shape) in plan.items():
        node = node_of.get(path)
        mod = modules[path]
        drop = node is not None and dropout_key is not None and node.method.dropout > 0
        cached = node is not None and path in caches
        if node is not None:
            for name, arr in node.params.items():
                setattr(mod, "kernel" + SEP + name, LowRankParam(arr))
        if drop:
            setattr(mod, "kernel" + SEP + DROPOUT_KEY, LowRankParam(dropout_key_data(dropout_key, path, node)))
        if cached:
            setattr(mod, "kernel" + SEP + CACHE, LowRankParam(caches[path]))
        mod._lowrank_spec = _Spec(path, kind, None if node is None else node.aux, kernel_shape, cached, drop,
                                  adapter_dtype)
        object.__setattr__(mod, "__class__", _factored_class(type(mod)))
    return copy, shared


class shared_scope:
    """Makes the shared frozen arrays (VeRA projections) visible to factored layers while active."""

    def __init__(self, shared: Mapping):
        self.shared = shared

    def __enter__(self):
        self._token = _SHARED.set(self.shared)
        return self

    def __exit__(self, *exc):
        _SHARED.reset(self._token)
        return False


def apply(model: nnx.Module, frozen: Any, adapter: Any, *args, dropout_key: jax.Array | None = None,
          method: str | Callable | None = None, adapter_dtype: Any = None, return_state: bool = False,
          adapter_ids: Any = None, **kwargs) -> Any:
    """Run ``model`` with ``frozen`` params and ``adapter`` factored — equal to the merged model's call.

    Args:
      model: an NNX module; only read (its variables, classes and attributes stay as they are).
      frozen: the frozen tree from ``lowrank_jax.init(method, params_of(model), key, layouts=...)``
        (it may hold NF4 kernels and the shared VeRA entry); ``nnx.Param`` paths absent from it keep
        the model's own values.
      adapter: the adapter tree (``None``/``{}``: the base model with ``frozen`` params).
      *args, **kwargs: the call's arguments.
      dropout_key: PRNG key for adapter dropout (adapter branch input only); ``None``: no dropout.
      method: call this method (name) of the model, or ``method(module, *args, **kwargs)``, instead
        of ``__call__``.
      adapter_dtype: dtype of the branch's thin matmuls (default: the adapter arrays' dtype).
      return_state: also return the copy's non-``Param`` state after the call (RNG counters, batch
        statistics, caches) for ``nnx.update(model, state)``; otherwise such updates are dropped.
      adapter_ids: for a stacked adapter (:func:`lowrank_jax.stack`): ``(B,)`` ints, example ``b`` runs
        with adapter ``adapter_ids[b]`` (``-1``: the base); adapted layers' inputs lead with the batch.

    Works under ``jax.jit`` and ``jax.grad`` with the adapter as the differentiated argument (call it
    inside the traced function), including models that apply ``nnx.vmap``-stacked layers with
    ``nnx.scan`` + ``nnx.remat``: the adapter arrays ride as per-layer state of the adapted layers.
    """
    copy, shared = factored_model(model, frozen, adapter, dropout_key=dropout_key, adapter_dtype=adapter_dtype)
    token = _ADAPTER_IDS.set(check_adapter_ids(adapter, adapter_ids, "lowrank_jax.nnx.apply"))
    try:
        out = _run(copy, shared, method, args, kwargs)
    finally:
        _ADAPTER_IDS.reset(token)
    if not return_state:
        return out
    return out, nnx.state(copy, nnx.Not(nnx.Param))


def _run(copy: nnx.Module, shared: Mapping, method: str | Callable | None, args: tuple, kwargs: dict) -> Any:
    with shared_scope(shared):
        if method is None:
            out = copy(*args, **kwargs)
        elif isinstance(method, str):
            out = getattr(copy, method)(*args, **kwargs)
        else:
            out = method(copy, *args, **kwargs)
    return out


def merged_model(model: nnx.Module, frozen: Any, adapter: Any) -> nnx.Module:
    """A clone of ``model`` holding ``lowrank_jax.merge(frozen, adapter)`` (the merge path, for
    inference/export); the original model is not modified."""
    from lowrank_jax.tree import merge
    merged = merge(frozen, adapter) if adapter else base_params(frozen)
    clone = nnx.clone(model)
    state = nnx.state(clone, nnx.Param)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(clone, state)
    return clone
