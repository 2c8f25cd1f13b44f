"""Tree-wide transforms: ``init`` (params → frozen, adapter), ``merge`` (→ effective params), counting.

Paths are the ``/``-joined keys of a leaf (``encoder/layer_0/attention/query/kernel``); a method's
``targets`` regexes are ``re.fullmatch``ed against them. Each targeted kernel is viewed as a stack of
``(in, out)`` matrices through its :class:`~lowrank_jax.layout.Layout`; the method's per-matrix math
is ``vmap``ped over the stack (``init`` of a shape-only method: a loop over the layers when eager), always in
float32, and results are cast back to the kernel's dtype.

The frozen tree has exactly the structure of ``params`` (kernels possibly replaced by a PiSSA residual
or an :class:`~lowrank_jax.quant.nf4.NF4Array`), plus, when a method has shared frozen arrays (VeRA)
or per-kernel caches (DoRA's ``‖W0_j‖²``), one extra top-level entry ``SHARED_KEY``.
:func:`base_params` strips it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.adapter import AdapterParams, is_adapter
from lowrank_jax.layout import DEFAULT_LAYOUT, Layout, resolve_layout
from lowrank_jax.methods.base import count_matrix_params, matches
from lowrank_jax.paths import example_paths, flatten_with_paths, key_name, key_value, path_str
from lowrank_jax.quant import nf4
from lowrank_jax.quant.kernels import (
    is_quantized,
    kernel_of,
    kernel_shape_of,
    layout_of,
    matrix_of,
    quantize_selected,
    requantize_like,
)

__all__ = ["SHARED_KEY", "BASE_SQ_NORMS", "init", "merge", "base_params", "count_params", "expected_count",
           "adapter_nodes", "check_fit", "frozen_matrix", "frozen_caches", "merge_leaf", "path_str",
           "flatten_with_paths", "resolve_layout", "key_name"]

SHARED_KEY = "__lowrank_shared__"
# frozen[SHARED_KEY][BASE_SQ_NORMS][path]: a method's per-kernel frozen cache (DoRA's ‖W0_j‖² per output
# unit, (*stack, out)), computed at init because W0 is frozen. The name is kept for files and trees
# written by earlier versions.
BASE_SQ_NORMS = "dora_base_sq_norms"

Array = jax.Array
LayoutSpec = Mapping[str, Layout] | None


def base_params(frozen: Any) -> Any:
    """The frozen tree without the ``SHARED_KEY`` entry (VeRA projections, DoRA norm cache): what the model sees."""
    if isinstance(frozen, Mapping) and SHARED_KEY in frozen:
        return {k: v for k, v in frozen.items() if k != SHARED_KEY}
    return frozen


def shared_of(frozen: Any) -> Mapping:
    """The ``SHARED_KEY`` entry of a frozen tree (``{}`` when absent)."""
    if isinstance(frozen, Mapping) and SHARED_KEY in frozen:
        return frozen[SHARED_KEY]
    return {}


def frozen_caches(frozen: Any) -> Mapping[str, Array]:
    """``{path: cached array}`` of the per-kernel frozen caches (DoRA's ``‖W0_j‖²``)."""
    return shared_of(frozen).get(BASE_SQ_NORMS, {})


def set_path(tree: dict, keys: Sequence[Any], value: Any) -> None:
    """Set ``tree[k0][k1]...[kn] = value``, creating the intermediate dicts."""
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


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


def stack_apply(fn, stack_shape: tuple[int, ...], *args, in_axes):
    """``vmap`` ``fn`` over the flattened ``stack_shape`` leading axes of the mapped args."""
    if not stack_shape:
        return fn(*args)
    n = int(np.prod(stack_shape))
    flat = [a.reshape(n, *a.shape[len(stack_shape):]) if ax == 0 else a for a, ax in zip(args, in_axes)]
    out = jax.vmap(fn, in_axes=in_axes)(*flat)
    return jax.tree_util.tree_map(lambda o: o.reshape(*stack_shape, *o.shape[1:]), out)


# one compiled program per kernel shape (eager `all(isfinite(w))` is two, and a slower boolean reduction)
_finite = jax.jit(nf4.finite_flag)


class _ShapeOnly:
    """``W0`` for a method whose ``reads_base_at_init`` is False: ``shape``, ``dtype``, ``ndim``, no values.
    Using it as an array raises at once, eager or traced (a ``jax.ShapeDtypeStruct`` would be captured as a
    constant under ``jit`` and fail only at lowering, far from the method)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        self.shape, self.dtype = tuple(shape), jnp.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __jax_array__(self):
        raise TypeError(f"W0 was given as a shape only {self.shape} (reads_base_at_init is False) and "
                        "cannot be read")

    def __repr__(self) -> str:
        return f"ShapeOnly(shape={self.shape}, dtype={self.dtype})"


def _init_each_layer(method: Any, keys: Array, stack: tuple[int, ...], matrix: _ShapeOnly,
                     shared: Any) -> tuple[dict[str, Array], None]:
    """``init_matrix`` of a method that reads only ``W0``'s shape (``matrix``, one layer's ``(in, out)``
    float32 stand-in), once per layer of a stacked kernel (``keys``: one key per layer, ``(*stack,)``;
    raw ``uint32`` keys ``(*stack, 2)``), stacked to ``(*stack, ...)``.

    Eagerly a Python loop over the layers: an eager ``vmap`` compiles the batched random init per shape
    (≈ 0.4 s each on XLA:CPU for LoRA's ``A``: threefry over a batch of keys), the loop reuses the unbatched
    program, with the same bits. Under a trace (``init`` under ``jit``, the sharded path) ``vmap``: one
    subgraph instead of one per layer.
    """
    def one(k):
        try:
            params, w_new = method.init_matrix(k, matrix, shared)
        except (TypeError, AttributeError, ValueError) as e:   # what reading the stand-in raises (eager or traced)
            raise TypeError(f"{type(method).__name__}.init_matrix failed on W0 given as a shape only "
                            f"({matrix}), because its reads_base_at_init is False: {type(e).__name__}: {e}. "
                            "A method whose init reads W0's values must set reads_base_at_init = True") from e
        if w_new is not None:
            raise TypeError(f"{type(method).__name__}: reads_base_at_init is False but init_matrix returned a new "
                            "base W0 (computed from what?); a method that replaces W0 must read it "
                            "(reads_base_at_init = True)")
        return params

    if not stack:
        return one(keys), None
    flat = keys.reshape(-1, *keys.shape[len(stack):])
    if isinstance(flat, jax.core.Tracer) or flat.shape[0] == 0:
        out = jax.vmap(one)(flat)
    else:
        outs = [one(k) for k in flat]
        out = {name: jnp.stack([o[name] for o in outs]) for name in outs[0]}
    return {name: a.reshape(*stack, *a.shape[1:]) for name, a in out.items()}, None


def _shape_only_cache(method: Any, matrix: _ShapeOnly) -> None:
    """A shape-only method must have no per-kernel cache (``frozen_cache`` would read ``W0``)."""
    try:
        cache = method.frozen_cache(matrix)
    except Exception as e:   # it read W0's values
        raise TypeError(f"{type(method).__name__}: reads_base_at_init is False but frozen_cache reads W0 "
                        f"({type(e).__name__}: {e}); set reads_base_at_init = True") from None
    if cache is not None:
        raise TypeError(f"{type(method).__name__}: reads_base_at_init is False but frozen_cache returned an array; "
                        "set reads_base_at_init = True")


def _apply_quant_shorthand(methods: tuple[Any, ...], params: Any, layouts: LayoutSpec) -> tuple[Any, set[str]]:
    """``LoRA(..., quant=NF4(...))``: quantize the method's targets (∩ ``NF4.targets``) first.

    Returns the params and the paths quantized here (their kernels were checked finite while quantized).
    """
    from lowrank_jax.quant.config import NF4

    before = params
    for m in methods:
        q = getattr(m, "quant", None)
        if q is None:
            continue
        select = (lambda p, m=m, q=q: matches(m.targets, p) and (q.targets is None or matches(q.targets, p)))
        params = quantize_selected(params, NF4(q.block_size, q.double_quant, None, q.compute_dtype),
                                   layouts=layouts, rest_dtype=None, select=select,
                                   what=f"{type(m).__name__} targets ∩ NF4 targets")
    if params is before:
        return params, set()
    was = dict(flatten_with_paths(before, is_leaf=is_quantized)[0])
    return params, {p for p, leaf in flatten_with_paths(params, is_leaf=is_quantized)[0]
                    if is_quantized(leaf) and not is_quantized(was.get(p))}


def _raise_not_finite(checks: list[tuple[str, Any, Array]]) -> None:
    """Raise naming the first kernel whose ``finite`` flag is false; ``checks``: ``(path, kernel, finite)``.

    The flags are fetched in one transfer after every kernel's work is dispatched (no sync per kernel);
    traced flags (init under ``jit``) are skipped.
    """
    checks = [c for c in checks if not isinstance(c[2], jax.core.Tracer)]
    flags = jax.device_get([c[2] for c in checks])
    for (path, w, _), ok in zip(checks, flags):
        if not ok:
            detail = (nf4.describe_non_finite(jnp.asarray(w, jnp.float32)) + " (checked in float32)" if not is_quantized(w)
                      else "non-finite NF4 block scales (NaN/inf)")
            raise ValueError(f"init: {path}: the kernel contains {detail}; "
                             "an adapter fit to it would be NaN from the first step")


def init(method: Any, params: Any, key: Array, *, layouts: LayoutSpec = None) -> tuple[Any, Any]:
    """Split ``params`` into ``(frozen, adapter)`` for ``method`` (or a sequence of methods).

    Args:
      method: a method value (``LoRA``, ``DoRA``, ``VeRA``, ``DVoRA``) or a sequence of them with
        disjoint targets.
      params: the model's params pytree (nested dicts; a linen ``params`` collection, NNX state),
        possibly with NF4 kernels from :func:`lowrank_jax.quantize` — any kernel, quantized or not,
        can be adapted (the adapter is fit to the stored, dequantized base).
      key: a ``jax.random`` key; each target's init uses ``fold_in(key, crc32(path))``, so adding a
        target does not change the others.
      layouts: ``{path or regex: Layout}`` for kernels that are not plain ``(in, out)`` matrices
        (multi-axis, ``nn.scan``-stacked); e.g. the result of :func:`lowrank_jax.discover`. A
        quantized kernel carries its own layout.

    Returns:
      ``frozen``: ``params`` with targeted kernels replaced where the method says so (PiSSA residual;
      NF4 with the ``quant=`` shorthand), plus shared frozen arrays and caches under ``SHARED_KEY``;
      never trained.
      ``adapter``: nested dicts over the targeted paths, one :class:`~lowrank_jax.AdapterParams` per
      kernel, holding only trainable float32 arrays.
      When ``params`` are placed with ``NamedSharding`` on a multi-device mesh, both are placed like
      the kernels (:mod:`lowrank_jax.sharding`) by one jitted program: no full array on one device.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lj
      >>> params = {"q": {"kernel": jnp.ones((16, 8))}, "v": {"kernel": jnp.ones((16, 8))}}
      >>> frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r"q/kernel"), params, jax.random.key(0))
      >>> adapter["q"]["kernel"]["a"].shape, adapter["q"]["kernel"]["b"].shape
      ((16, 2), (2, 8))
      >>> bool((lj.merge(frozen, adapter)["q"]["kernel"] == params["q"]["kernel"]).all())
      True
    """
    methods = _methods_tuple(method)
    if isinstance(params, Mapping) and SHARED_KEY in params:
        raise ValueError(f"init: params already contain {SHARED_KEY!r}: pass the original params, not a frozen tree")
    # Params placed on a multi-device mesh: this whole function runs as one jitted program whose outputs
    # are placed like the kernels (lowrank_jax.sharding.init_placed; it calls back here with tracers).
    from lowrank_jax import sharding
    placed = sharding.init_placed(init, method, params, key, layouts)
    if placed is not None:
        return placed
    params, checked = _apply_quant_shorthand(methods, params, layouts)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    named, _ = flatten_with_paths(params, is_leaf=is_quantized)
    paths = [p for p, _ in named]

    # Which method adapts which leaf.
    owner: dict[int, int] = {}
    for mi, m in enumerate(methods):
        hits = [i for i, p in enumerate(paths) if matches(m.targets, p)]
        if not hits:
            kernels = [p for p in paths if p.rsplit("/", 1)[-1] in ("kernel", "weight", "embedding")] or paths
            raise ValueError(
                f"init: {type(m).__name__} targets {list(m.targets)} match no parameter path. "
                f"Paths that exist include: {example_paths(kernels)}"
            )
        for i in hits:
            if i in owner:
                raise ValueError(
                    f"init: {paths[i]} is targeted by two methods: {methods[owner[i]]!r} and {m!r}; "
                    "targets of several methods must be disjoint"
                )
            owner[i] = mi

    # Validate every target and collect its matrix shape.
    info: dict[int, tuple[Layout, tuple[int, ...], str, int, int]] = {}
    for i, mi in owner.items():
        path, leaf = paths[i], leaves[i][1]
        if is_quantized(leaf):
            layout, shape, dtype = layout_of(leaf), kernel_shape_of(leaf), leaf.dtype
            given = resolve_layout(path, shape, layouts) if layouts else None
            if given is not None and len(shape) > 2 and given != layout:
                raise ValueError(f"init: {path}: layouts gives {given} but the kernel was quantized with {layout}")
        else:
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or getattr(leaf, "ndim", 0) < 2:
                raise ValueError(
                    f"init: {path}: targeted leaf must be a floating-point array with at least 2 dims, got "
                    f"{type(leaf).__name__} dtype={dtype} shape={getattr(leaf, 'shape', None)}"
                )
            shape = tuple(leaf.shape)
            layout = resolve_layout(path, shape, layouts)
        n_in, n_out = layout.matrix_shape(shape)
        methods[mi].check_shape(path, n_in, n_out)
        info[i] = (layout, shape, str(np.dtype(dtype)), n_in, n_out)

    # Shared frozen arrays (VeRA): sized to the element-wise max over the method's matrices.
    shared: dict[str, Any] = {}
    shared_name: dict[int, str | None] = {}
    for mi, m in enumerate(methods):
        dims = [(info[i][3], info[i][4]) for i, o in owner.items() if o == mi]
        arrays = m.make_shared(max(d[0] for d in dims), max(d[1] for d in dims))
        shared_name[mi] = None
        if arrays is not None:
            name = f"{type(m).__name__.lower()}_{mi}"
            shared[name] = arrays
            shared_name[mi] = name

    new_leaves = [v for _, v in leaves]
    adapter: dict = {}
    caches: dict[str, Array] = {}
    finite_checks: list[tuple[str, Any, Array]] = []
    for i, mi in sorted(owner.items()):
        m = methods[mi]
        path, leaf = paths[i], leaves[i][1]
        layout, shape, dtype, n_in, n_out = info[i]
        stack = layout.stack_shape(shape)
        reads = getattr(m, "reads_base_at_init", True)
        if reads:
            w = matrix_of(leaf) if is_quantized(leaf) else layout.to_matrix(jnp.asarray(leaf)).astype(jnp.float32)
        else:                                         # the method needs the shape only: no dequantization
            w = _ShapeOnly((n_in, n_out), jnp.float32)
        if path not in checked:                       # a kernel quantized above was checked then
            kernel = leaf if is_quantized(leaf) else jnp.asarray(leaf)
            finite_checks.append((path, kernel, nf4.all_finite(leaf) if is_quantized(leaf) else _finite(kernel)))
        leaf_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        if stack:
            keys = jax.random.split(leaf_key, int(np.prod(stack)))
            keys = keys.reshape(*stack, *keys.shape[1:])
        else:
            keys = leaf_key
        sh = shared.get(shared_name[mi])
        if reads:
            arrays, w_new = stack_apply(lambda k, wm: m.init_matrix(k, wm, sh), stack, keys, w, in_axes=(0, 0))
        else:
            arrays, w_new = _init_each_layer(m, keys, stack, w, sh)
            _shape_only_cache(m, w)
        if w_new is not None:                         # PiSSA: the residual base (re-quantized if NF4)
            kernel = layout.from_matrix(w_new, shape)
            new_leaves[i] = requantize_like(kernel, leaf) if is_quantized(leaf) else kernel.astype(dtype)
        node = AdapterParams(arrays, m, layout, shape, dtype, shared_name[mi])
        set_path(adapter, [key_value(k) for k in leaves[i][0]], node)
        w_frozen = w if w_new is None else frozen_matrix(new_leaves[i], node)
        cache = stack_apply(m.frozen_cache, stack, w_frozen, in_axes=(0,)) if reads else None
        if cache is not None:
            caches[path] = cache

    _raise_not_finite(finite_checks)
    frozen = jax.tree_util.tree_unflatten(treedef, new_leaves)
    if caches and isinstance(frozen, Mapping):        # else the step recomputes them
        shared[BASE_SQ_NORMS] = caches
    if shared:
        if not isinstance(frozen, Mapping):
            raise TypeError(f"init: {sorted(shared)} need params to be a mapping at the top level, "
                            f"got {type(params).__name__}")
        frozen = {**frozen, SHARED_KEY: shared}
    return frozen, adapter


# -------------------------------------------------------------------------------------- merge

def frozen_matrix(leaf: Any, node: AdapterParams) -> Array:
    """The frozen kernel of ``node`` as a float32 ``(*stack, in, out)`` matrix (dequantized if NF4)."""
    if is_quantized(leaf):
        return matrix_of(leaf)
    return node.layout.to_matrix(jnp.asarray(leaf)).astype(jnp.float32)


def check_fit(path: str, leaf: Any, node: AdapterParams, shared: Mapping | None = None,
              where: str = "merge") -> None:
    """Raise ``ValueError`` (prefixed ``where: path:``) unless ``node`` fits the frozen ``leaf``.

    The one check :func:`merge`, :func:`lowrank_jax.apply` and the NNX path all run: kernel shape
    (or the NF4 kernel's shape and layout), every adapter array's shape against the method's
    declaration, floating dtypes, the shared arrays the node reads (VeRA projections) and the
    per-kernel cache (DoRA's ``‖W0_j‖²``) when ``shared`` is given.
    """
    if not isinstance(node, AdapterParams):
        raise TypeError(f"{where}: {path}: expected an AdapterParams node, got {type(node).__name__}")
    if is_quantized(leaf):
        shape, layout = kernel_shape_of(leaf), layout_of(leaf)
        if shape != node.shape or (layout.in_axes, layout.out_axes, layout.stack) != \
                (node.layout.in_axes, node.layout.out_axes, node.layout.stack):
            raise ValueError(f"{where}: {path}: the NF4 frozen kernel stores shape {shape} with {layout}, the "
                             f"adapter was made for shape {node.shape} with {node.layout}")
    else:
        shape = tuple(getattr(leaf, "shape", ()))
        if shape != node.shape:
            raise ValueError(
                f"{where}: {path}: frozen kernel has shape {shape} but the adapter was made for shape {node.shape}"
            )
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{where}: {path}: frozen kernel must be a floating array, got dtype {dtype}")
    n_in, n_out = node.layout.matrix_shape(node.shape)
    stack = node.layout.stack_shape(node.shape)
    expected = {k: stack + v for k, v in node.method.param_shapes(n_in, n_out).items()}
    if set(node.params) != set(expected):
        raise ValueError(f"{where}: {path}: adapter arrays {sorted(node.params)} do not match "
                         f"{type(node.method).__name__}'s {sorted(expected)}")
    for k, v in node.params.items():
        got = tuple(getattr(v, "shape", ()))
        if got != expected[k]:
            raise ValueError(f"{where}: {path}: adapter array {k!r} has shape {got}, expected {expected[k]}")
        dt = getattr(v, "dtype", None)
        if dt is None or not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"{where}: {path}: adapter array {k!r} must be floating, got dtype {dt}")
    if shared is None:
        return
    if node.shared:
        sh = shared.get(node.shared)
        if sh is None:
            raise ValueError(f"{where}: {path}: the frozen tree has no shared arrays {node.shared!r} "
                             f"({type(node.method).__name__}'s projections); pass the frozen tree from init")
        spec = node.method.shared_arrays
        for k, s in spec.items():
            got = tuple(getattr(sh.get(k), "shape", ()))
            need = s.shape(n_in, n_out, node.method.rank)
            if len(got) != len(need) or any(g < n for g, n in zip(got, need)) or \
                    any(s.axes[i] == "rank" and got[i] != need[i] for i in range(len(need))):
                raise ValueError(f"{where}: {path}: shared array {node.shared}/{k} has shape {got}; "
                                 f"this kernel needs at least {need} (rank {node.method.rank})")
    cache = frozen_caches({SHARED_KEY: shared}).get(path)
    if cache is not None:
        want = stack + (n_out,)
        if tuple(cache.shape) != want:
            raise ValueError(f"{where}: {path}: cached base norms have shape {tuple(cache.shape)}, the kernel "
                             f"needs {want}; drop frozen[SHARED_KEY][{BASE_SQ_NORMS!r}] after changing W0")


def adapter_nodes(adapter: Any) -> list[tuple[str, AdapterParams]]:
    """``[(path, node), ...]`` of every :class:`AdapterParams` in ``adapter``."""
    flat, _ = flatten_with_paths(adapter, is_leaf=is_adapter)
    out = []
    for p, v in flat:
        if not isinstance(v, AdapterParams):
            raise TypeError(f"adapter: leaf at {p!r} is a {type(v).__name__}, not an AdapterParams node")
        out.append((p, v))
    return out


def fitted_nodes(frozen: Any, adapter: Any, where: str) -> tuple[list[tuple[str, AdapterParams]], dict[str, Any]]:
    """``(nodes, {path: frozen leaf})`` after checking every node fits ``frozen`` (see :func:`check_fit`)."""
    shared = shared_of(frozen)
    leaves = dict(flatten_with_paths(base_params(frozen), is_leaf=is_quantized)[0])
    nodes = adapter_nodes(adapter) if adapter else []
    for path, node in nodes:
        if path not in leaves:
            raise ValueError(f"{where}: adapter path {path!r} is not in the frozen tree. "
                             f"Frozen paths include: {example_paths(list(leaves))}")
        check_fit(path, leaves[path], node, shared, where)
    return nodes, leaves


def merge_leaf(leaf: Any, node: AdapterParams, shared: Mapping, path: str = "?") -> Array:
    """Effective kernel ``W'`` for one adapted leaf, in the kernel's original dtype and shape."""
    check_fit(path, leaf, node, shared)
    w = frozen_matrix(leaf, node)
    stack = node.layout.stack_shape(node.shape)
    sh = shared.get(node.shared) if node.shared else None
    arrays = dict(node.params)
    names = list(arrays)
    merged = stack_apply(
        lambda wm, *vals: node.method.merge_matrix(wm, dict(zip(names, vals)), sh),
        stack, w, *arrays.values(), in_axes=(0,) * (1 + len(names)),
    )
    return node.layout.from_matrix(merged, node.shape).astype(node.dtype)


def merge(frozen: Any, adapter: Any, *, requantize: bool = False) -> Any:
    """Effective params ``W' = W0 + ΔW`` (LoRA/VeRA) or DoRA's ``m ⊙ V'/‖V'‖`` at every adapted path.

    Computed in float32 and cast back to each kernel's dtype; the result has the structure, shapes and
    dtypes of the original ``params`` (the ``SHARED_KEY`` entry is dropped). At an eager init it equals
    ``params`` bitwise (``init`` under ``jax.jit``: DoRA's magnitude is a fused norm, within 2 ulp). Every NF4 kernel — adapted or not — comes back dequantized in its original
    shape and dtype, unless ``requantize=True``: then adapted NF4 kernels are re-quantized with their
    settings (new absmax; rounding error as bitsandbytes' 4-bit merge) and the others stay as stored.

    Raises ``ValueError`` naming the path and both shapes when ``adapter`` does not fit ``frozen``.
    """
    if not isinstance(requantize, bool):
        raise TypeError(f"merge: requantize must be a bool, got {requantize!r}")
    shared = shared_of(frozen)
    nodes, _ = fitted_nodes(frozen, adapter, "merge")
    merged_at = dict(nodes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(base_params(frozen), is_leaf=is_quantized)
    new = []
    for p, leaf in leaves:
        path = path_str(p)
        node = merged_at.get(path)
        if node is None:
            new.append(leaf if (requantize or not is_quantized(leaf)) else kernel_of(leaf))
            continue
        w = merge_leaf(leaf, node, shared, path)
        new.append(requantize_like(w, leaf) if requantize and is_quantized(leaf) else w)
    return jax.tree_util.tree_unflatten(treedef, new)


# -------------------------------------------------------------------------------------- counts

def count_params(adapter: Any) -> int:
    """Number of trainable scalars in ``adapter`` (the sum of its array sizes)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(adapter)))


def expected_count(method: Any, shape: Sequence[int], layout: Layout = DEFAULT_LAYOUT) -> int:
    """Trainable scalars ``method`` adds to a kernel of ``shape`` (its declaration, for planning)."""
    n_in, n_out = layout.matrix_shape(shape)
    stack = layout.stack_shape(shape)
    return int(np.prod(stack, dtype=np.int64)) * count_matrix_params(method, n_in, n_out)
