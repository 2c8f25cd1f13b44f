"""Partition specs for adapters, derived from those of the kernels they adapt.

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

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lowrank_jax.adapter import AdapterParams, is_adapter
from lowrank_jax.methods.base import IN, OUT, RANK
from lowrank_jax.paths import flatten_with_paths

__all__ = ["adapter_specs", "named"]


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


def _node_specs(node: AdapterParams, spec: PartitionSpec, path: str) -> AdapterParams:
    lay = node.layout
    entries = tuple(spec) + (None,) * (lay.ndim - len(tuple(spec)))
    if len(entries) != lay.ndim:
        raise ValueError(f"{path}: partition spec {spec} has {len(tuple(spec))} entries, the kernel has "
                         f"{lay.ndim} axes (shape {node.shape})")
    stack = entries[:lay.stack]
    per_layer = entries[lay.stack:]
    in_spec = _flat_axes(tuple(per_layer[a] for a in lay.in_axes))
    out_spec = _flat_axes(tuple(per_layer[a] for a in lay.out_axes))
    axis_spec = {IN: in_spec, OUT: out_spec, RANK: None}
    declared = node.method.arrays
    unknown = set(node.params) - set(declared)
    if unknown:
        raise ValueError(f"{path}: adapter arrays {sorted(unknown)} are not declared by {type(node.method).__name__}")
    return node.replace(**{k: PartitionSpec(*stack, *(axis_spec[a] for a in declared[k].axes)) for k in node.params})


def adapter_specs(adapter: Any, param_specs: Any) -> Any:
    """A tree like ``adapter`` whose leaves are the ``PartitionSpec`` of each adapter array.

    Args:
      adapter: the adapter tree from :func:`lowrank_jax.init`.
      param_specs: a tree with the structure of the params (or frozen) tree whose leaves are
        ``PartitionSpec`` or ``NamedSharding`` (kernels without an entry — ``None`` — are replicated).
    """
    is_spec = lambda x: isinstance(x, (PartitionSpec, NamedSharding)) or x is None  # noqa: E731
    flat, _ = flatten_with_paths(param_specs, is_leaf=is_spec)
    specs = {p: (v.spec if isinstance(v, NamedSharding) else v) for p, v in flat}
    nodes, treedef = flatten_with_paths(adapter, is_leaf=is_adapter)
    out = []
    for path, node in nodes:
        if path not in specs and not isinstance(param_specs, PartitionSpec):
            raise ValueError(f"adapter_specs: no spec for kernel {path!r} in param_specs")
        spec = specs.get(path) or PartitionSpec()
        out.append(_node_specs(node, spec, path))
    return jax.tree_util.tree_unflatten(treedef, out)


def named(mesh: jax.sharding.Mesh, specs: Any) -> Any:
    """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` leaf of ``specs``."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))
