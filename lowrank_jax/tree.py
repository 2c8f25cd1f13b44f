"""Tree-wide transforms: ``init`` (params → frozen, adapter), ``merge`` (→ effective params), counting.

Paths are the ``/``-joined keys of a leaf (``encoder/layer_0/attention/query/kernel``); a method's
``targets`` regexes are ``re.fullmatch``ed against them. Each targeted kernel is viewed as a stack of
``(in, out)`` matrices through its :class:`~lowrank_jax.layout.Layout`; the method's per-matrix math
is ``vmap``ped over the stack, always in float32, and results are cast back to the kernel's dtype.

The frozen tree has exactly the structure of ``params`` (kernels possibly replaced by a PiSSA residual
or an :class:`~lowrank_jax.quant.nf4.NF4Array`), plus, when VeRA is used, one extra top-level entry
``SHARED_KEY`` holding the shared frozen projections. :func:`base_params` strips it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.adapter import AdapterParams, is_adapter
from lowrank_jax.layout import DEFAULT_LAYOUT, Layout
from lowrank_jax.methods.base import count_matrix_params, matches

SHARED_KEY = "__lowrank_shared__"
# frozen[SHARED_KEY][BASE_SQ_NORMS][path]: DoRA's ‖W0_j‖² per output unit, (*stack, out), cached at init
# because W0 is frozen; the factored path then reads W0 once per step (for W0ᵀA) instead of twice.
BASE_SQ_NORMS = "dora_base_sq_norms"

Array = jax.Array
LayoutSpec = Mapping[str, Layout] | None


# ----------------------------------------------------------------------------------------- paths

def key_name(k: Any) -> str:
    """One path element as a string (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """``/``-joined path of a ``jax.tree_util`` key path."""
    return "/".join(key_name(k) for k in path)


def _is_frozen_leaf(x: Any) -> bool:
    """``True`` for frozen leaves that are pytrees themselves (NF4-quantized kernels)."""
    return type(x).__name__ == "NF4Array" and hasattr(x, "packed")


def flatten_with_paths(tree: Any, is_leaf=None) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, leaf), ...], treedef)`` with string paths."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), v) for p, v in leaves], treedef


def base_params(frozen: Any) -> Any:
    """The frozen tree without the ``SHARED_KEY`` entry (VeRA projections, DoRA norm cache): what the model sees."""
    if isinstance(frozen, Mapping) and SHARED_KEY in frozen:
        return {k: v for k, v in frozen.items() if k != SHARED_KEY}
    return frozen


def _shared_of(frozen: Any) -> Mapping:
    if isinstance(frozen, Mapping) and SHARED_KEY in frozen:
        return frozen[SHARED_KEY]
    return {}


def _set_path(tree: dict, keys: Sequence[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def _path_keys(path: Sequence[Any]) -> list[Any]:
    out = []
    for k in path:
        if hasattr(k, "key"):
            out.append(k.key)
        elif hasattr(k, "name"):
            out.append(k.name)
        elif hasattr(k, "idx"):
            out.append(k.idx)
        else:
            out.append(str(k))
    return out


# ------------------------------------------------------------------------------------- layouts

def resolve_layout(path: str, shape: tuple[int, ...], layouts: LayoutSpec) -> Layout:
    """The layout of the kernel at ``path``: exact key, then first regex key, then 2-D default."""
    if layouts:
        if path in layouts:
            layout = layouts[path]
        else:
            import re
            layout = next((v for k, v in layouts.items() if re.fullmatch(k, path)), None)
        if layout is not None:
            layout.check(shape, path)
            return layout
    if len(shape) == 2:
        return DEFAULT_LAYOUT
    raise ValueError(
        f"{path}: kernel of shape {shape} has {len(shape)} axes, so which are stacked layers, inputs "
        f"and outputs is ambiguous. Pass layouts={{{path!r}: lowrank_jax.Layout(in_axes=..., "
        f"out_axes=..., stack=...)}} or layouts=lowrank_jax.discover(model, variables, *example_args)."
    )


# --------------------------------------------------------------------------------------- init

def _methods_tuple(method: Any) -> tuple[Any, ...]:
    if isinstance(method, Sequence) and not isinstance(method, str):
        methods = tuple(method)
        if not methods:
            raise ValueError("init: the sequence of methods is empty")
    else:
        methods = (method,)
    for m in methods:
        if not hasattr(m, "init_matrix"):
            raise TypeError(f"init: expected a method such as lowrank_jax.LoRA(...), got {m!r}")
    return methods


def _stack_apply(fn, stack_shape: tuple[int, ...], *args, in_axes):
    """``vmap`` ``fn`` over the flattened ``stack_shape`` leading axes of the mapped args."""
    if not stack_shape:
        return fn(*args)
    n = int(np.prod(stack_shape))
    flat = [a.reshape(n, *a.shape[len(stack_shape):]) if ax == 0 else a for a, ax in zip(args, in_axes)]
    out = jax.vmap(fn, in_axes=in_axes)(*flat)
    return jax.tree_util.tree_map(lambda o: o.reshape(*stack_shape, *o.shape[1:]), out)


def _quantizes(method: Any, path: str) -> bool:
    q = getattr(method, "quant", None)
    return q is not None and (q.targets is None or matches(q.targets, path))


def _example_paths(paths: Sequence[str], k: int = 12) -> str:
    shown = list(paths[:k])
    more = f" … ({len(paths) - k} more)" if len(paths) > k else ""
    return ", ".join(shown) + more


def init(method: Any, params: Any, key: Array, *, layouts: LayoutSpec = None) -> tuple[Any, Any]:
    """Split ``params`` into ``(frozen, adapter)`` for ``method`` (or a sequence of methods).

    Args:
      method: a method value (``LoRA``, ``DoRA``, ``VeRA``) or a sequence of them with disjoint targets.
      params: the model's params pytree (nested dicts; a linen ``params`` collection, NNX state).
      key: a ``jax.random`` key; each target's init uses ``fold_in(key, crc32(path))``, so adding a
        target does not change the others.
      layouts: ``{path or regex: Layout}`` for kernels that are not plain ``(in, out)`` matrices
        (multi-axis, ``nn.scan``-stacked); e.g. the result of :func:`lowrank_jax.discover`.

    Returns:
      ``frozen``: ``params`` with targeted kernels replaced where the method says so (PiSSA residual,
      NF4), plus the shared frozen VeRA projections under ``SHARED_KEY``; never trained.
      ``adapter``: nested dicts over the targeted paths, one :class:`~lowrank_jax.AdapterParams` per
      kernel, holding only trainable float32 arrays.

    Example:
      >>> frozen, adapter = lowrank_jax.init(LoRA(rank=8, targets=r".*/(query|value)/kernel"), params, key)
      >>> merged = lowrank_jax.merge(frozen, adapter)   # == params, bitwise, at init
    """
    methods = _methods_tuple(method)
    if isinstance(params, Mapping) and SHARED_KEY in params:
        raise ValueError(f"init: params already contain {SHARED_KEY!r}: pass the original params, not a frozen tree")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in leaves]

    # Which method adapts which leaf.
    owner: dict[int, int] = {}
    for mi, m in enumerate(methods):
        hits = [i for i, p in enumerate(paths) if matches(m.targets, p)]
        if not hits:
            kernels = [p for p in paths if p.rsplit("/", 1)[-1] in ("kernel", "weight", "embedding")] or paths
            raise ValueError(
                f"{type(m).__name__} targets {list(m.targets)} match no parameter path. "
                f"Paths that exist include: {_example_paths(kernels)}"
            )
        for i in hits:
            if i in owner:
                raise ValueError(
                    f"{paths[i]} is targeted by two methods: {methods[owner[i]]!r} and {m!r}; "
                    "targets of several methods must be disjoint"
                )
            owner[i] = mi

    # Validate every target and collect its matrix shape.
    info: dict[int, tuple[Layout, int, int]] = {}
    for i, mi in owner.items():
        path, leaf = paths[i], leaves[i][1]
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or getattr(leaf, "ndim", 0) < 2:
            raise ValueError(
                f"{path}: targeted leaf must be a floating-point array with at least 2 dims, got "
                f"{type(leaf).__name__} dtype={dtype} shape={getattr(leaf, 'shape', None)}"
            )
        layout = resolve_layout(path, tuple(leaf.shape), layouts)
        n_in, n_out = layout.matrix_shape(leaf.shape)
        methods[mi].check_shape(path, n_in, n_out)
        info[i] = (layout, n_in, n_out)

    # Shared frozen arrays (VeRA): sized to the element-wise max over the method's matrices.
    shared: dict[str, Any] = {}
    shared_name: dict[int, str | None] = {}
    for mi, m in enumerate(methods):
        dims = [(info[i][1], info[i][2]) for i, o in owner.items() if o == mi]
        arrays = m.make_shared(max(d[0] for d in dims), max(d[1] for d in dims))
        shared_name[mi] = None
        if arrays is not None:
            name = f"{type(m).__name__.lower()}_{mi}"
            shared[name] = arrays
            shared_name[mi] = name

    new_leaves = [v for _, v in leaves]
    adapter: dict = {}
    norm_cache: dict[str, Array] = {}
    for i, mi in sorted(owner.items()):
        m = methods[mi]
        path, leaf = paths[i], leaves[i][1]
        layout, n_in, n_out = info[i]
        stack = layout.stack_shape(leaf.shape)
        w = layout.to_matrix(jnp.asarray(leaf)).astype(jnp.float32)
        quantized = _quantizes(m, path)
        if quantized:
            try:
                q = _quantize_matrix(w, m.quant, len(stack), leaf.dtype)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{path}: cannot NF4-quantize this kernel: {e}") from None
            w = _dequantize_matrix(q)                         # the adapter is fit to the stored base
        n_layers = int(np.prod(stack)) if stack else 1
        leaf_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        if stack:
            keys = jax.random.split(leaf_key, n_layers)
            keys = keys.reshape(*stack, *keys.shape[1:])
        else:
            keys = leaf_key
        sh = shared.get(shared_name[mi])
        arrays, w_new = _stack_apply(
            lambda k, wm: m.init_matrix(k, wm, sh), stack, keys, w, in_axes=(0, 0)
        )
        if w_new is not None:
            w = w_new
            new_leaves[i] = layout.from_matrix(w, leaf.shape).astype(leaf.dtype)
        if quantized:
            new_leaves[i] = _quantize_matrix(w, m.quant, len(stack), leaf.dtype)
        node = AdapterParams(arrays, m, layout, tuple(leaf.shape), str(leaf.dtype), shared_name[mi])
        _set_path(adapter, _path_keys(leaves[i][0]), node)
        if getattr(m, "caches_base_norm", False) and isinstance(params, Mapping):
            norm_cache[path] = jnp.sum(jnp.square(frozen_matrix(new_leaves[i], node)), axis=-2)

    frozen = jax.tree_util.tree_unflatten(treedef, new_leaves)
    if norm_cache:
        shared[BASE_SQ_NORMS] = norm_cache
    if shared:
        if not isinstance(frozen, Mapping):
            raise TypeError(f"init: VeRA needs params to be a mapping at the top level, got {type(params).__name__}")
        # (a DoRA norm cache is only made for mapping params, so this is VeRA's case)
        frozen = {**frozen, SHARED_KEY: shared}
    return frozen, adapter


def _quantize_matrix(w: Array, quant: Any, batch_dims: int, dtype: Any) -> Any:
    """NF4 of the transposed ``(*stack, out, in)`` matrix (torch layout), per layer."""
    from lowrank_jax.quant import nf4
    return nf4.quantize(jnp.swapaxes(w, -1, -2).astype(dtype), block_size=quant.block_size,
                        double_quant=quant.double_quant, batch_dims=batch_dims)


def _dequantize_matrix(q: Any, dtype: Any = jnp.float32) -> Array:
    """``(*stack, in, out)`` matrix from an NF4 store of its transpose."""
    from lowrank_jax.quant import nf4
    return jnp.swapaxes(nf4.dequantize(q, dtype), -1, -2)


# -------------------------------------------------------------------------------------- merge

def frozen_matrix(leaf: Any, node: AdapterParams) -> Array:
    """The frozen kernel of ``node`` as a float32 ``(*stack, in, out)`` matrix (dequantized if NF4)."""
    if _is_frozen_leaf(leaf):
        return _dequantize_matrix(leaf)
    return node.layout.to_matrix(jnp.asarray(leaf)).astype(jnp.float32)


def _check_fit(path: str, leaf: Any, node: AdapterParams) -> None:
    if _is_frozen_leaf(leaf):
        stack = node.layout.stack_shape(node.shape)
        n_in, n_out = node.layout.matrix_shape(node.shape)
        got = tuple(leaf.batch_shape) + tuple(leaf.shape)
        want = stack + (n_out, n_in)
        if got != want:
            raise ValueError(f"merge: {path}: NF4 frozen kernel holds {got}, the adapter expects {want}")
        return
    shape = tuple(getattr(leaf, "shape", ()))
    if shape != node.shape:
        raise ValueError(
            f"merge: {path}: frozen kernel has shape {shape} but the adapter was made for shape {node.shape}"
        )
    n_in, n_out = node.layout.matrix_shape(node.shape)
    stack = node.layout.stack_shape(node.shape)
    expected = {k: stack + v for k, v in node.method.param_shapes(n_in, n_out).items()}
    for k, v in node.params.items():
        got = tuple(getattr(v, "shape", ()))
        if got != expected.get(k):
            raise ValueError(f"merge: {path}: adapter array {k!r} has shape {got}, expected {expected.get(k)}")


def adapter_nodes(adapter: Any) -> list[tuple[str, AdapterParams]]:
    """``[(path, node), ...]`` of every :class:`AdapterParams` in ``adapter``."""
    flat, _ = flatten_with_paths(adapter, is_leaf=is_adapter)
    out = []
    for p, v in flat:
        if not isinstance(v, AdapterParams):
            raise TypeError(f"adapter: leaf at {p!r} is a {type(v).__name__}, not an AdapterParams node")
        out.append((p, v))
    return out


def merge_leaf(leaf: Any, node: AdapterParams, shared: Mapping, path: str = "?") -> Array:
    """Effective kernel ``W'`` for one adapted leaf, in the kernel's original dtype and shape."""
    _check_fit(path, leaf, node)
    w = frozen_matrix(leaf, node)
    stack = node.layout.stack_shape(node.shape)
    sh = shared.get(node.shared) if node.shared else None
    if node.shared and sh is None:
        raise ValueError(f"merge: {path}: the frozen tree has no shared arrays {node.shared!r} (VeRA projections)")
    arrays = dict(node.params)
    names = list(arrays)
    merged = _stack_apply(
        lambda wm, *vals: node.method.merge_matrix(wm, dict(zip(names, vals)), sh),
        stack, w, *arrays.values(), in_axes=(0,) * (1 + len(names)),
    )
    return node.layout.from_matrix(merged, node.shape).astype(node.dtype)


def merge(frozen: Any, adapter: Any, *, requantize: bool = False) -> Any:
    """Effective params ``W' = W0 + ΔW`` (LoRA/VeRA) or DoRA's ``m ⊙ V'/‖V'‖`` at every adapted path.

    Computed in float32 and cast back to each kernel's dtype; the result has the structure, shapes and
    dtypes of the original ``params`` (the shared VeRA entry is dropped). At init it equals ``params``
    bitwise. NF4 kernels come back dequantized (full precision) unless ``requantize=True``, which
    re-quantizes ``W'`` with the same NF4 settings (new absmax; rounding error as bitsandbytes'
    4-bit merge).

    Raises ``ValueError`` naming the path and both shapes when ``adapter`` does not fit ``frozen``.
    """
    shared = _shared_of(frozen)
    base = base_params(frozen)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_frozen_leaf)
    index = {path_str(p): i for i, (p, _) in enumerate(leaves)}
    new = [v for _, v in leaves]
    done: set[int] = set()
    for path, node in adapter_nodes(adapter):
        if path not in index:
            raise ValueError(
                f"merge: adapter path {path!r} is not in the frozen tree. "
                f"Frozen paths include: {_example_paths(list(index))}"
            )
        i = index[path]
        leaf = new[i]
        merged = merge_leaf(leaf, node, shared, path)
        if requantize and _is_frozen_leaf(leaf):
            from lowrank_jax.quant import nf4
            stack = node.layout.stack_shape(node.shape)
            merged = nf4.quantize(jnp.swapaxes(node.layout.to_matrix(merged), -1, -2),
                                  block_size=leaf.block_size, double_quant=leaf.double_quant,
                                  batch_dims=len(stack))
        new[i] = merged
        done.add(i)
    for i, v in enumerate(new):
        if _is_frozen_leaf(v) and i not in done:
            raise ValueError(f"merge: {path_str(leaves[i][0])} is NF4-quantized but has no adapter")
    return jax.tree_util.tree_unflatten(treedef, new)


# -------------------------------------------------------------------------------------- counts

def count_params(adapter: Any) -> int:
    """Number of trainable scalars in ``adapter`` (the sum of its array sizes)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(adapter)))


def expected_count(method: Any, shape: Sequence[int], layout: Layout = DEFAULT_LAYOUT) -> int:
    """Trainable scalars ``method`` adds to a kernel of ``shape`` (its formula, for planning)."""
    n_in, n_out = layout.matrix_shape(shape)
    stack = layout.stack_shape(shape)
    return int(np.prod(stack)) * count_matrix_params(method, n_in, n_out) if stack else \
        count_matrix_params(method, n_in, n_out)
