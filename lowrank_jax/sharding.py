"""Partition specs for adapters, derived from those of the kernels they adapt.

Sharded params go in, sharded adapters come out: :func:`lowrank_jax.init` and :func:`lowrank_jax.quantize`
on params placed with ``NamedSharding`` run as one jitted program whose outputs are placed by the rules
below, so no full array ever lands on one device. The kernel specs may also come from a
``PartitionSpec`` tree or from Flax metadata (:func:`specs_of`), NF4 leaves are sharded along their
blocks (:func:`nf4_specs`), shared frozen arrays and caches follow the kernels that read them
(:func:`frozen_specs`), optimizer state follows the adapter (:func:`opt_state_specs`), and
``make_train_step(..., mesh=...)`` pins all of them in the jitted step. Meshes are expected to have
``Auto`` axes (``jax.sharding.Mesh(devices, names)``; ``jax.make_mesh`` needs
``axis_types=(jax.sharding.AxisType.Auto,) * n`` in JAX versions that default to ``Explicit``, where Flax
layers themselves refuse contractions over sharded dimensions).

An adapter array is sharded like the part of the kernel it stands for, with the rank axis replicated
(the rule used by Qwix/MaxText). The rule is derived from each method's array declaration
(:class:`~lowrank_jax.methods.base.ArraySpec`): an ``in`` axis takes the kernel's input-axes spec, an
``out`` axis its output-axes spec, a ``rank`` axis none:

    kernel  (*stack, *in_axes, *out_axes)  spec  P(*S, *I, *O)
    a        (*stack, in, r)                       P(*S, I', None)
    b        (*stack, r, out)                      P(*S, None, O')
    m, lambda_b (*stack, out)                      P(*S, O')
    lambda_d (*stack, r)                           P(*S, None)

where ``I'`` / ``O'`` combine the mesh axes of the kernel's in / out axes (the matrix view flattens
them). Under tensor parallelism ``x @ A`` then needs one all-reduce of an ``(tokens, r)`` partial sum,
which is cheap.

    >>> import jax, jax.numpy as jnp, lowrank_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> _, adapter = lj.init(lj.LoRA(rank=2), {"d": {"kernel": jnp.ones((8, 4))}}, jax.random.key(0))
    >>> specs = lj.sharding.adapter_specs(adapter, {"d": {"kernel": P("data", "model")}})
    >>> tuple(specs["d"]["kernel"]["a"]), tuple(specs["d"]["kernel"]["b"])
    (('data', None), (None, 'model'))
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> adapter = jax.device_put(adapter, lj.sharding.named(mesh, specs))
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lowrank_jax.adapter import AdapterParams, is_adapter
from lowrank_jax.methods.base import IN, OUT, RANK
from lowrank_jax.paths import flatten_with_paths, path_str
from lowrank_jax.quant import nf4
from lowrank_jax.quant.kernels import is_quantized, kernel_shape_of, layout_of, matrix_of

__all__ = ["adapter_specs", "named", "specs_of", "mesh_of", "nf4_specs", "frozen_specs", "opt_state_specs",
           "fsdp_axes", "current_fsdp_axes", "with_fsdp", "place", "place_adapter", "place_frozen",
           "PinnedStep", "FallbackWarning"]

class FallbackWarning(UserWarning):
    """An array is placed with fewer mesh axes than its kernel's spec asks for (the reason is in the message)."""


def _flat_axes(entries: tuple) -> Any:
    """Combine the mesh axes of several kernel axes into the spec entry of their flattened axis."""
    names: list[str] = []
    for e in entries:
        if e is None:
            continue
        names.extend(e if isinstance(e, tuple) else (e,))
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def _roles(layout: Any, spec: PartitionSpec, path: str, shape: Any) -> tuple[tuple, Any, Any]:
    """``(stack entries, in entry, out entry)`` of a kernel spec in the matrix view of ``layout``."""
    spec = PartitionSpec() if spec is None else spec
    entries = tuple(spec) + (None,) * (layout.ndim - len(tuple(spec)))
    if len(entries) != layout.ndim:
        raise ValueError(f"{path}: partition spec {spec} has {len(tuple(spec))} entries, the kernel has "
                         f"{layout.ndim} axes (shape {shape})")
    per_layer = entries[layout.stack:]
    return (entries[:layout.stack], _flat_axes(tuple(per_layer[a] for a in layout.in_axes)),
            _flat_axes(tuple(per_layer[a] for a in layout.out_axes)))


_FSDP_AXES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("lowrank_jax_fsdp_axes", default=())


@contextlib.contextmanager
def fsdp_axes(*names: str):
    """Within this context, mesh axes ``names`` are storage-only (FSDP / ZeRO-3) axes for every spec this
    module derives (:func:`adapter_specs`, :func:`frozen_specs`, hence :func:`lowrank_jax.init`,
    :func:`lowrank_jax.quantize`, ``make_train_step(mesh=...)``'s optimizer state): see :func:`with_fsdp`.

    >>> import lowrank_jax as lj
    >>> with lj.sharding.fsdp_axes("fsdp"):
    ...     lj.sharding.current_fsdp_axes()
    ('fsdp',)
    """
    token = _FSDP_AXES.set(tuple(names))
    try:
        yield tuple(names)
    finally:
        _FSDP_AXES.reset(token)


def current_fsdp_axes() -> tuple[str, ...]:
    """The storage-only mesh axes of the enclosing :func:`fsdp_axes` context (``()`` outside one)."""
    return _FSDP_AXES.get()


def with_fsdp(spec: PartitionSpec, shape: Any, roles: Any, mesh: Any, axes: Any = None) -> PartitionSpec:
    """``spec`` with each storage-only (FSDP) mesh axis it does not use yet added to one array axis.

    A kernel-derived spec leaves an adapter array replicated over the mesh axes that shard the other
    side of the kernel (under 1-D FSDP of ``(in, out)`` on ``in``, ``B (r, out)`` and ``m (out,)`` would be
    whole on every device). An FSDP axis only stores: the step gathers the array before use, so it
    may shard any axis. Each one is appended to the largest axis whose role is not ``rank`` and whose
    size it divides (with the axes already there); none fits: left out. ``roles`` names each axis
    (``"stack"``, ``"in"``, ``"out"``, ``"rank"``); ``axes`` defaults to :func:`current_fsdp_axes`.
    """
    axes = current_fsdp_axes() if axes is None else tuple(axes)
    if not axes or mesh is None:
        return spec
    shape = tuple(shape)
    entries = [(e if isinstance(e, tuple) else (e,)) if e is not None else ()
               for e in tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))]
    used = {n for e in entries for n in e}
    for a in axes:
        if a in used or a not in mesh.shape:
            continue
        fits = [i for i, r in enumerate(roles) if r != RANK
                and shape[i] % (math.prod(mesh.shape[n] for n in entries[i]) * mesh.shape[a]) == 0]
        if fits:
            i = max(fits, key=lambda j: shape[j])
            entries[i] = entries[i] + (a,)
            used.add(a)
    return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in entries))


def _node_specs(node: AdapterParams, spec: PartitionSpec, path: str, mesh: Any = None) -> AdapterParams:
    stack, in_spec, out_spec = _roles(node.layout, spec, path, node.shape)
    axis_spec = {IN: in_spec, OUT: out_spec, RANK: None}
    declared = node.method.arrays
    unknown = set(node.params) - set(declared)
    if unknown:
        raise ValueError(f"{path}: adapter arrays {sorted(unknown)} are not declared by {type(node.method).__name__}")
    out = {}
    for k, v in node.params.items():
        roles = ("stack",) * len(stack) + tuple(declared[k].axes)
        out[k] = with_fsdp(PartitionSpec(*stack, *(axis_spec[a] for a in declared[k].axes)), v.shape, roles, mesh)
    return node.replace(**out)


def adapter_specs(adapter: Any, param_specs: Any, mesh: Any = None) -> Any:
    """A tree like ``adapter`` whose leaves are the ``PartitionSpec`` of each adapter array.

    Args:
      adapter: the adapter tree from :func:`lowrank_jax.init`.
      param_specs: a tree with the structure of the params (or frozen) tree whose leaves are
        ``PartitionSpec`` or ``NamedSharding`` (kernels without an entry — ``None`` — are replicated),
        or anything :func:`specs_of` reads: the params themselves (placed arrays, NF4 leaves), Flax
        ``nn.Partitioned`` / logically partitioned boxes, an NNX state.
      mesh: needed only inside :func:`fsdp_axes` (for the axis sizes); default: the mesh the
        ``param_specs`` arrays are placed on.
    """
    specs = _spec_map(param_specs)
    if mesh is None and current_fsdp_axes():
        mesh = mesh_of(param_specs)
    nodes, treedef = flatten_with_paths(adapter, is_leaf=is_adapter)
    out = []
    for path, node in nodes:
        if path not in specs and not isinstance(param_specs, PartitionSpec):
            raise ValueError(f"adapter_specs: no spec for kernel {path!r} in param_specs")
        spec = specs.get(path) or PartitionSpec()
        out.append(_node_specs(node, spec, path, mesh))
    return jax.tree_util.tree_unflatten(treedef, out)


def named(mesh: jax.sharding.Mesh, specs: Any) -> Any:
    """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` leaf of ``specs``."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


# ------------------------------------------------------------------------------ reading specs

def _is_box(x: Any) -> bool:
    """A Flax linen ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` box or an NNX ``Variable``."""
    try:
        from flax.core import meta
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, (meta.Partitioned, nnx.Variable))


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding, nf4.NF4Array)) or _is_box(x)


def _array_spec(x: Any) -> PartitionSpec | None:
    sh = getattr(x, "sharding", None)
    if isinstance(sh, NamedSharding):
        return sh.spec
    return PartitionSpec() if hasattr(x, "shape") else None


def _nf4_kernel_spec(q: nf4.NF4Array) -> PartitionSpec:
    """The kernel spec an NF4 leaf's placement stands for (see :func:`nf4_specs`): the stack axes of its
    batch dims, and the mesh axes of its block axis on the kernel's (first) output axis — a device holds
    whole rows of the torch ``(out, in)`` matrix, i.e. a range of output units."""
    spec = _array_spec(q.packed) or PartitionSpec()
    entries = tuple(spec) + (None,) * (q.packed.ndim - len(tuple(spec)))
    lay = layout_of(q)
    per_layer: list[Any] = [None] * (lay.ndim - lay.stack)
    per_layer[lay.out_axes[0]] = entries[-1]
    return PartitionSpec(*entries[:-1], *per_layer)


def specs_of(tree: Any, *, rules: Any = None) -> Any:
    """The ``PartitionSpec`` of every leaf of a params tree, as a tree of the *unboxed* structure.

    Reads, leaf by leaf:

    * arrays (or ``jax.ShapeDtypeStruct``) placed with a ``NamedSharding`` → its spec; other arrays → ``P()``;
    * ``PartitionSpec`` / ``NamedSharding`` leaves (an explicit spec tree) → themselves / their spec;
    * Flax linen boxes: ``nn.Partitioned`` (``nn.with_partitioning``) → ``P(*names)``;
      ``nn.LogicallyPartitioned`` (``nn.with_logical_partitioning``) → ``nn.logical_to_mesh_axes(names,
      rules)`` (``rules`` defaults to the box's own rules, then the ``nn.logical_axis_rules`` context);
    * NNX: a module or ``nnx.State`` (``nnx.get_partition_spec``: ``sharding`` / ``out_sharding``
      metadata, logical names mapped by ``rules`` or the context), returned as nested plain dicts like
      :func:`lowrank_jax.execution.nnx.params_of`;
    * an :class:`~lowrank_jax.quant.nf4.NF4Array` → the spec of the *kernel* its placement stands for
      (stack axes; the block axis's mesh axes on the output axis: a device holds whole output rows).

    Non-array leaves give ``None`` (replicated).

    >>> import jax.numpy as jnp, flax.linen as nn, lowrank_jax as lj
    >>> boxed = {"d": {"kernel": nn.LogicallyPartitioned(jnp.zeros((4, 8)), ("embed", "mlp")),
    ...                "bias": nn.Partitioned(jnp.zeros(8), ("model",))}}
    >>> specs = lj.sharding.specs_of(boxed, rules=[("embed", "data"), ("mlp", "model")])
    >>> tuple(specs["d"]["kernel"]), tuple(specs["d"]["bias"])
    (('data', 'model'), ('model',))
    """
    import flax.linen as nn
    from flax import nnx
    from flax.core import meta

    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State) or any(isinstance(x, nnx.Variable) for x in jax.tree_util.tree_leaves(
            tree, is_leaf=lambda x: isinstance(x, nnx.Variable))):
        import contextlib

        with nn.logical_axis_rules(rules) if rules is not None else contextlib.nullcontext():
            specs = nnx.get_partition_spec(tree)
        if isinstance(specs, nnx.State):
            specs = nnx.to_pure_dict(specs)
        return jax.tree_util.tree_map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, specs,
                                      is_leaf=lambda x: isinstance(x, (nnx.Variable, PartitionSpec)))

    def leaf(x: Any) -> Any:
        if x is None or isinstance(x, PartitionSpec):
            return x
        if isinstance(x, NamedSharding):
            return x.spec
        if isinstance(x, nn.LogicallyPartitioned):
            return PartitionSpec(*nn.logical_to_mesh_axes(x.names, rules if rules is not None else x.rules))
        if isinstance(x, meta.Partitioned):
            return PartitionSpec(*x.names)
        if is_quantized(x):
            return _nf4_kernel_spec(x)
        return _array_spec(x)

    return jax.tree_util.tree_map(leaf, tree, is_leaf=_is_spec_leaf)


def _spec_map(param_specs: Any) -> dict[str, PartitionSpec | None]:
    """``{path: spec}`` of :func:`specs_of` (a bare ``PartitionSpec`` stays one entry, under ``""``)."""
    flat, _ = flatten_with_paths(specs_of(param_specs), is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))
    return dict(flat)


def mesh_of(tree: Any) -> jax.sharding.Mesh | None:
    """The one ``Mesh`` the ``NamedSharding``-placed arrays of ``tree`` live on (``None``: none placed).

    Raises ``ValueError`` when arrays of ``tree`` are placed on two different meshes.
    """
    found: dict[Any, str] = {}
    flat, _ = flatten_with_paths(tree)
    for path, x in flat:
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and not isinstance(sh.mesh, jax.sharding.AbstractMesh):
            found.setdefault(sh.mesh, path)
    if len(found) > 1:
        (m1, p1), (m2, p2) = list(found.items())[:2]
        raise ValueError(f"arrays are placed on two meshes: {p1!r} on {dict(m1.shape)} {m1.devices.ravel()[:4]}…, "
                         f"{p2!r} on {dict(m2.shape)} {m2.devices.ravel()[:4]}…; place them on one mesh")
    return next(iter(found), None)


def _mesh_size(mesh: Any, entry: Any) -> int:
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    return math.prod(mesh.shape[n] for n in names)


# ------------------------------------------------------------------------------ NF4 leaves

def nf4_specs(q: nf4.NF4Array, kernel_spec: PartitionSpec | None, mesh: Any,
              path: str = "kernel") -> tuple[nf4.NF4Array, str | None]:
    """The specs of an NF4 leaf's arrays for a kernel placed with ``kernel_spec``; and why mesh axes were dropped.

    An ``NF4Array`` stores each layer's kernel as its torch-layout ``(out, in)`` matrix flattened
    row-major into blocks of ``block_size``: ``packed (*stack, n/2)``, ``absmax (*stack, n_blocks)``
    (double quantization: ``nested_absmax (*stack, ⌈n_blocks/256⌉)``, ``offset (*stack,)``). Splitting
    the flat axis into ``k`` equal contiguous ranges gives each device whole output rows — the kernel
    sharded on its output axes — exactly when ``k`` divides ``out`` and each device's
    ``out/k · in`` weights are whole blocks (``block_size`` divides them). So:

    * stack axes keep the kernel's stack spec (every array);
    * ``packed`` and ``absmax`` are split along the flat axis over the kernel's output mesh axes
      followed by its input mesh axes (``(O, I)``, output-major: a device's range lies inside its
      output shard; the input mesh axes of an FSDP-sharded kernel become more row splitting, since
      blocks never hold a strided column range);
    * ``nested_absmax`` too when ``256 · k`` divides ``n_blocks``, else replicated (it is
      ``1/256`` of ``absmax``); ``offset`` (one scale per matrix) is replicated.

    When ``(O, I)`` does not line up, ``O`` alone is tried, then nothing (replicated); the returned
    reason says which boundary failed (``None`` when every mesh axis of the kernel was kept).
    Works on abstract leaves (``jax.ShapeDtypeStruct`` children) too.
    """
    lay, shape = layout_of(q), kernel_shape_of(q)
    stack, in_e, out_e = _roles(lay, kernel_spec, path, shape)
    n_out, n_in = q.shape
    names = lambda e: () if e is None else (e if isinstance(e, tuple) else (e,))  # noqa: E731
    wanted = names(out_e) + names(in_e)
    reason = None
    chosen: tuple = ()
    for cand in dict.fromkeys([wanted, names(out_e), ()]):
        k = _mesh_size(mesh, cand)
        if k == 1:
            chosen = cand
            break
        if n_out % k:
            why = f"its {n_out} output rows do not split into {k} equal parts"
        elif (n_out // k * n_in) % q.block_size:
            why = (f"a device's {n_out // k} rows × {n_in} = {n_out // k * n_in} weights are not whole blocks of "
                   f"{q.block_size} (blocks would straddle devices)")
        else:
            chosen = cand
            break
        reason = reason or f"mesh axes {cand} on the NF4 blocks: {why}"
    if chosen != wanted:
        kept = f"kept {chosen}" if chosen else "replicated along the blocks"
        reason = f"{path}: {reason}; {kept}"
    else:
        reason = None
    entry = None if not chosen else (chosen[0] if len(chosen) == 1 else chosen)
    k = _mesh_size(mesh, entry)
    nested_entry = entry if q.double_quant and q.n_blocks % (256 * k) == 0 else None
    stack = tuple(stack)
    return q.replace(
        packed=PartitionSpec(*stack, entry), absmax=PartitionSpec(*stack, entry),
        nested_absmax=None if q.nested_absmax is None else PartitionSpec(*stack, nested_entry),
        offset=None if q.offset is None else PartitionSpec(*stack)), reason


# ------------------------------------------------------------------------------ frozen trees

def _shared_spec(key: str, arr: Any, users: list[tuple[str, AdapterParams]],
                 kernel_specs: Mapping[str, Any], mesh: Any) -> PartitionSpec:
    """A shared frozen array (VeRA's projections) follows the kernels that read it whole: an ``in``
    (``out``) axis takes the input (output) spec of the kernels whose input (output) size equals the
    array's, when they all agree and the mesh divides it; ``rank`` axes and any disagreement: none."""
    if not users:
        return PartitionSpec()
    declared = users[0][1].method.shared_arrays.get(key)
    if declared is None or len(declared.axes) != len(arr.shape):
        return PartitionSpec()
    entries = []
    for i, role in enumerate(declared.axes):
        seen = set()
        for path, node in users:
            if role == RANK:
                break
            _, in_e, out_e = _roles(node.layout, kernel_specs.get(path), path, node.shape)
            n_in, n_out = node.layout.matrix_shape(node.shape)
            if (n_in if role == IN else n_out) == arr.shape[i]:
                seen.add(in_e if role == IN else out_e)
        e = seen.pop() if len(seen) == 1 else None
        if e is not None and mesh is not None and arr.shape[i] % _mesh_size(mesh, e):
            e = None
        entries.append(e)
    return with_fsdp(PartitionSpec(*entries), arr.shape, declared.axes, mesh)


def frozen_specs(frozen: Any, adapter: Any, param_specs: Any, mesh: Any, *, warn: bool = True) -> Any:
    """The spec tree of a frozen tree (from :func:`lowrank_jax.init` / :func:`lowrank_jax.quantize`).

    Every leaf keeps its kernel's spec (``param_specs``: anything :func:`specs_of` reads, keyed like the
    params); an NF4 leaf gets :func:`nf4_specs` of its kernel spec (a :class:`FallbackWarning` names
    the leaf when block boundaries drop mesh axes); under ``SHARED_KEY``, a per-kernel cache
    (DoRA's ``‖W0_j‖²``, ``(*stack, out)``) follows the kernel's stack and output specs, and shared
    arrays (VeRA's projections) follow their declared ``in``/``out`` roles (:func:`_shared_spec`); caches
    and shared arrays also take the :func:`fsdp_axes` of the context (:func:`with_fsdp`).
    ``frozen`` and ``adapter`` may be abstract (``jax.eval_shape``).
    """
    from lowrank_jax.tree import BASE_SQ_NORMS, SHARED_KEY, adapter_nodes, base_params

    kernel_specs = _spec_map(param_specs)
    nodes = dict(adapter_nodes(adapter)) if adapter else {}

    def base_leaf(kp: Any, leaf: Any) -> Any:
        path = path_str(kp)
        spec = kernel_specs.get(path)
        if is_quantized(leaf):
            specs, reason = nf4_specs(leaf, spec, mesh, path)
            if reason and warn:
                warnings.warn(f"NF4 leaf placed with fewer mesh axes than its kernel: {reason}", FallbackWarning,
                              stacklevel=4)
            return specs
        if spec is None:
            return PartitionSpec() if hasattr(leaf, "shape") else None
        return spec

    out = jax.tree_util.tree_map_with_path(base_leaf, base_params(frozen), is_leaf=is_quantized)
    if not (isinstance(frozen, Mapping) and SHARED_KEY in frozen):
        return out
    shared_out: dict[str, Any] = {}
    for name, arrays in frozen[SHARED_KEY].items():
        if name == BASE_SQ_NORMS:
            caches = {}
            for path, c in arrays.items():
                node = nodes.get(path)
                spec = PartitionSpec()
                if node is not None:
                    stack, _, out_e = _roles(node.layout, kernel_specs.get(path), path, node.shape)
                    n_out = node.layout.matrix_shape(node.shape)[1]
                    if tuple(c.shape) == node.layout.stack_shape(node.shape) + (n_out,):
                        spec = with_fsdp(PartitionSpec(*stack, out_e), c.shape, ("stack",) * len(stack) + (OUT,),
                                         mesh)
                caches[path] = spec
            shared_out[name] = caches
        else:
            users = [(p, n) for p, n in nodes.items() if n.shared == name]
            shared_out[name] = {k: _shared_spec(k, v, users, kernel_specs, mesh) for k, v in arrays.items()}
    return {**out, SHARED_KEY: shared_out}


# ------------------------------------------------------------------------------ optimizer state

def opt_state_specs(opt_state: Any, adapter: Any, adapter_specs_tree: Any = None) -> Any:
    """The spec tree of an optimizer state over ``adapter``: a leaf whose key path ends with an adapter
    array's key path and has its shape (Adam's ``mu``/``nu``, also inside ``masked``/``multi_transform``
    states) takes that array's spec; everything else (step counts, schedules) is replicated.

    ``adapter_specs_tree`` gives the adapter's specs; default: those its arrays are placed with.
    """
    specs = adapter_specs_tree if adapter_specs_tree is not None else specs_of(adapter)
    is_spec = lambda x: x is None or isinstance(x, PartitionSpec)  # noqa: E731
    a_leaves = jax.tree_util.tree_flatten_with_path(adapter)[0]
    s_leaves = jax.tree_util.tree_leaves(specs, is_leaf=is_spec)
    by_path = {tuple(kp): (tuple(getattr(v, "shape", ())), s) for (kp, v), s in zip(a_leaves, s_leaves)}
    longest = max((len(k) for k in by_path), default=0)

    def leaf(kp: Any, x: Any) -> Any:
        kp = tuple(kp)
        shape = tuple(getattr(x, "shape", ()))
        for n in range(min(longest, len(kp)), 0, -1):
            hit = by_path.get(kp[-n:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return PartitionSpec() if hasattr(x, "shape") else None

    return jax.tree_util.tree_map_with_path(leaf, opt_state)


# ------------------------------------------------------------------------------ placing

def place(tree: Any, specs: Any, mesh: Any) -> Any:
    """``jax.device_put(tree, named(mesh, specs))`` (numpy leaves are copied shard by shard: nothing full
    lands on one device)."""
    return jax.device_put(tree, named(mesh, specs))


def place_adapter(adapter: Any, params_or_specs: Any, mesh: Any = None) -> Any:
    """The adapter placed like its kernels (:func:`adapter_specs`); ``mesh`` defaults to the one the
    params are placed on."""
    mesh = mesh if mesh is not None else mesh_of(params_or_specs)
    if mesh is None:
        raise ValueError("place_adapter: params_or_specs holds no placed arrays; pass mesh=")
    return place(adapter, adapter_specs(adapter, params_or_specs, mesh), mesh)


def place_frozen(frozen: Any, adapter: Any, params_or_specs: Any, mesh: Any = None) -> Any:
    """The frozen tree placed by :func:`frozen_specs` (NF4 leaves along their blocks, shared arrays
    and caches like the kernels that read them)."""
    mesh = mesh if mesh is not None else mesh_of(params_or_specs)
    if mesh is None:
        raise ValueError("place_frozen: params_or_specs holds no placed arrays; pass mesh=")
    return place(frozen, frozen_specs(frozen, adapter, params_or_specs, mesh), mesh)


def _placed_mesh(params: Any) -> Any:
    """The mesh of concrete params placed on more than one device, else ``None`` (tracers: ``None``)."""
    for x in jax.tree_util.tree_leaves(params):
        if isinstance(x, jax.core.Tracer):
            return None
    mesh = mesh_of(params)
    return mesh if mesh is not None and mesh.size > 1 else None


def _nonfinite_counts(leaves: Mapping[str, Any]) -> dict[str, int]:
    def count(x):
        w = matrix_of(x) if is_quantized(x) else x
        return jnp.sum(~jnp.isfinite(w))
    if not leaves:
        return {}
    counts = jax.jit(lambda ls: {p: count(x) for p, x in ls.items()})(dict(leaves))
    return {p: int(v) for p, v in jax.device_get(counts).items()}


def init_placed(init: Callable, method: Any, params: Any, key: Any, layouts: Any) -> tuple[Any, Any] | None:
    """``init(method, params, key)`` as one jitted program placed on the params' mesh, or ``None`` when the
    params are not placed on a multi-device mesh (then :func:`lowrank_jax.init` runs as usual).

    The outputs' shardings are fixed before anything is computed: adapter arrays by
    :func:`adapter_specs`, the frozen tree by :func:`frozen_specs`, both from the kernels' specs as
    placed (NF4 targets of the ``quant=`` shorthand from the unquantized kernel's spec). The kernels'
    NaN/inf check runs as one sharded reduction first.
    """
    mesh = _placed_mesh(params)
    if mesh is None:
        return None
    fn = lambda p, k: init(method, p, k, layouts=layouts)  # noqa: E731
    frozen_abs, adapter_abs = jax.eval_shape(fn, params, key)       # validates (same errors as eager)
    from lowrank_jax.tree import adapter_nodes
    leaves = dict(flatten_with_paths(params, is_leaf=is_quantized)[0])
    for path, bad in _nonfinite_counts({p: leaves[p] for p, _ in adapter_nodes(adapter_abs)}).items():
        if bad:
            raise ValueError(f"init: {path}: the kernel contains {bad} non-finite value(s) (NaN/inf); "
                             "an adapter fit to it would be NaN from the first step")
    pspecs = specs_of(params)
    out_sh = (named(mesh, frozen_specs(frozen_abs, adapter_abs, pspecs, mesh)),
              named(mesh, adapter_specs(adapter_abs, pspecs, mesh)))
    return jax.jit(fn, out_shardings=out_sh)(params, key)


def quantize_placed(quantize: Callable, params: Any) -> Any:
    """``quantize(params)`` as one jitted program whose NF4 leaves are placed by :func:`nf4_specs` of each
    kernel's spec (other leaves keep theirs), or ``None`` when the params are not placed on a
    multi-device mesh."""
    mesh = _placed_mesh(params)
    if mesh is None:
        return None
    out_abs = jax.eval_shape(quantize, params)
    before = dict(flatten_with_paths(params, is_leaf=is_quantized)[0])
    new = {p: before[p] for p, v in flatten_with_paths(out_abs, is_leaf=is_quantized)[0]
           if is_quantized(v) and not is_quantized(before.get(p))}
    for path, bad in _nonfinite_counts(new).items():
        if bad:
            raise ValueError(f"quantize: {path}: cannot NF4-quantize this kernel: it contains {bad} non-finite "
                             "value(s) (NaN/inf)")
    specs = frozen_specs(out_abs, None, specs_of(params), mesh)
    return jax.jit(quantize, out_shardings=named(mesh, specs))(params)


# ------------------------------------------------------------------------------ train steps

def _arg_sharding(x: Any, mesh: Any) -> NamedSharding:
    sh = getattr(x, "sharding", None)
    if isinstance(sh, NamedSharding) and sh.mesh == mesh:
        return sh
    return NamedSharding(mesh, PartitionSpec())


class PinnedStep:
    """A train step ``step(adapter, opt_state, frozen, batch, key=None)`` jitted with explicit shardings
    taken from its arguments: each placed argument array keeps its ``NamedSharding`` on ``mesh``
    (anything else is replicated on it); the returned adapter and optimizer state get the shardings
    of the ones passed in (so donation reuses their buffers) and the loss is replicated. One compiled
    program per argument structure and shardings. ``mesh="auto"``: the mesh the arguments are placed on.
    """

    def __init__(self, fn: Callable, mesh: Any, donate: bool):
        self.fn, self.mesh, self.donate = fn, mesh, donate
        self._cache: dict[Any, Any] = {}

    def _mesh(self, args: Any) -> Any:
        if self.mesh != "auto":
            return self.mesh
        mesh = mesh_of(args)
        if mesh is None:
            raise ValueError("train step with mesh='auto': no argument is placed on a mesh; pass mesh=Mesh(...)")
        return mesh

    def _jitted(self, args: tuple) -> tuple[Any, tuple]:
        mesh = self._mesh(args)
        leaves, treedef = jax.tree_util.tree_flatten(args)
        shardings = tuple(_arg_sharding(x, mesh) for x in leaves)
        key = (treedef, shardings)
        jitted = self._cache.get(key)
        if jitted is None:
            in_sh = jax.tree_util.tree_unflatten(treedef, shardings)
            out_sh = (in_sh[0], in_sh[1], NamedSharding(mesh, PartitionSpec()))
            jitted = jax.jit(self.fn, in_shardings=in_sh, out_shardings=out_sh,
                             donate_argnums=(0, 1) if self.donate else ())
            self._cache[key] = jitted
        moved = [x if getattr(x, "sharding", None) == s else jax.device_put(x, s) for x, s in zip(leaves, shardings)]
        return jitted, tuple(jax.tree_util.tree_unflatten(treedef, moved))

    def __call__(self, adapter, opt_state, frozen, batch, key=None):
        jitted, args = self._jitted((adapter, opt_state, frozen, batch, key))
        return jitted(*args)

    def lower(self, adapter, opt_state, frozen, batch, key=None):
        jitted, args = self._jitted((adapter, opt_state, frozen, batch, key))
        return jitted.lower(*args)


def placed_opt_init(opt_init: Callable, mesh: Any) -> Callable:
    """``opt_init(adapter)`` placed by :func:`opt_state_specs` (moments like the adapter arrays, counts
    replicated) on ``mesh`` (``"auto"``: the adapter's mesh)."""
    def init(adapter):
        m = mesh_of(adapter) if mesh == "auto" else mesh
        if m is None:
            return opt_init(adapter)
        specs = opt_state_specs(jax.eval_shape(opt_init, adapter), adapter)
        return jax.jit(opt_init, out_shardings=named(m, specs))(adapter)
    return init
