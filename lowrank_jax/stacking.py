"""Many adapters, one base: stack K adapters and let each example of a batch use its own.

    stacked = lj.stack([adapter_0, adapter_1, adapter_2])         # one adapter tree, K = 3
    y = lj.apply(model, {"params": frozen}, stacked, x, adapter_ids=jnp.array([0, 2, -1, 1]))
    y = lnx.apply(nnx_model, frozen, stacked, x, adapter_ids=ids)  # NNX
    adapters = lj.unstack(stacked)                                 # the K adapters back, bitwise

Example ``b`` of the batch runs with adapter ``ids[b]`` (``-1``: the bare base), computed factored and
grouped inside every adapted layer (:class:`~lowrank_jax.methods.stacked.Stacked`): no loop over
adapters, no per-adapter copy of the base. ``jax.grad`` w.r.t. the stacked tree gives slot ``k`` the
gradient of adapter ``k`` on its own examples, so K adapters train at once from one mixed batch (any
elementwise optimizer — Adam, SGD, weight decay — then updates each as its own run would). The stacked
arrays are the only data: swapping other adapters of the same configuration into a stack of the same
shape reuses the compiled function (the methods, ranks and targets are its static structure).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.methods.base import RANK
from lowrank_jax.methods.stacked import Stacked, family_of, is_stacked
from lowrank_jax.paths import key_value
from lowrank_jax.tree import set_path, adapter_nodes

Array = jax.Array

__all__ = ["stack", "unstack", "stack_size", "check_adapter_ids"]


def _node_stacked(path: str, entries: list[AdapterParams | None], rank: int | None) -> AdapterParams:
    present = [(k, n) for k, n in enumerate(entries) if n is not None]
    ref = present[0][1]
    for k, n in present:
        if is_stacked(n.method):
            raise TypeError(f"stack: adapter {k}: {path} is already stacked; lowrank_jax.unstack it first")
        if family_of(n.method) is None:
            raise TypeError(f"stack: adapter {k}: {path}: {type(n.method).__name__} cannot be stacked "
                            "(LoRA, DoRA, VeRA and DVoRA can)")
        if getattr(n.method, "init", None) == "pissa":
            raise ValueError(f"stack: adapter {k}: {path}: a PiSSA adapter changes its frozen base (W0 − s·A@B), "
                             "so it cannot share one base with other adapters")
        if (n.layout, n.shape, n.dtype) != (ref.layout, ref.shape, ref.dtype):
            raise ValueError(f"stack: {path}: adapter {k} was made for kernel {n.shape} {n.dtype} with {n.layout}, "
                             f"adapter {present[0][0]} for {ref.shape} {ref.dtype} with {ref.layout}")
        if family_of(n.method) != family_of(ref.method):
            raise TypeError(f"stack: {path}: adapter {present[0][0]} is {type(ref.method).__name__} and adapter {k} "
                            f"is {type(n.method).__name__}; one kernel's adapters must all be LoRA/DoRA or all "
                            "VeRA/DVoRA")
        if n.shared != ref.shared:
            raise ValueError(f"stack: {path}: adapters {present[0][0]} and {k} read different shared frozen arrays "
                             f"({ref.shared!r}, {n.shared!r}); stacked adapters share one frozen tree")
    need = max(n.method.rank for _, n in present)
    if family_of(ref.method) == "vera":
        rank_now = need
    elif rank is None:
        rank_now = need
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank < need:
        raise ValueError(f"stack: rank={rank!r} is below the rank {need} of an adapter at {path}")
    else:
        rank_now = rank
    method = Stacked(tuple(None if n is None else n.method for n in entries), rank_now)
    lay = ref.layout
    n_in, n_out = lay.matrix_shape(ref.shape)
    stack_shape = lay.stack_shape(ref.shape)
    slot = method.slot_shapes(n_in, n_out)
    arrays = {}
    for name, spec in method.arrays.items():
        axes = spec.axes[1:]
        dtypes = [n.params[name].dtype for _, n in present if name in n.params]
        dtype = jnp.result_type(*dtypes)
        parts = []
        for n in entries:
            if n is None or name not in n.params:       # untargeted slot, or LoRA beside DoRA: zeros
                parts.append(jnp.zeros(stack_shape + slot[name], dtype))
                continue
            arr = jnp.asarray(n.params[name]).astype(dtype)
            pad = [(0, 0)] * arr.ndim
            for i, ax in enumerate(axes):
                if ax == RANK:
                    pad[lay.stack + i] = (0, rank_now - arr.shape[lay.stack + i])
            parts.append(jnp.pad(arr, pad) if any(p != (0, 0) for p in pad) else arr)
        arrays[name] = jnp.stack(parts, axis=lay.stack)
    return AdapterParams(arrays, method, lay, ref.shape, ref.dtype, ref.shared)


def stack(adapters: Sequence[Any], *, rank: int | None = None) -> Any:
    """One stacked adapter tree holding ``adapters`` (all made for the same frozen tree) as slots ``0 … K−1``.

    Args:
      adapters: K adapter trees from :func:`lowrank_jax.init` (LoRA, DoRA, VeRA, DVoRA; trained or not).
        They may target different kernels (a kernel an adapter does not target gets an empty slot that
        contributes nothing) and have different ranks, scales and methods, as long as the adapters of
        one kernel are all LoRA/DoRA or all VeRA/DVoRA (VeRA: the same projections, i.e. rank and seed).
      rank: pad LoRA/DoRA ranks to this (default: the largest rank at each kernel); a fixed value keeps
        the arrays' shapes when other adapters are stacked later.

    Returns:
      An adapter tree over the union of the targeted paths with one
      :class:`~lowrank_jax.methods.stacked.Stacked` node per kernel (arrays ``(*layer_stack, K, ...)``).
      Run it with ``lowrank_jax.apply(..., adapter_ids=ids)``; :func:`unstack` inverts it bitwise.
    """
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"stack: expected a non-empty list of adapter trees, got {type(adapters).__name__}")
    per, keys_of = [], {}
    for k, ad in enumerate(adapters):
        if isinstance(ad, AdapterParams) or not ad:
            raise TypeError(f"stack: adapter {k} must be a non-empty adapter tree (nested dicts of AdapterParams)")
        nodes = _keyed_nodes(ad)
        per.append({path: node for path, _, node in nodes})
        for path, keys, _ in nodes:
            keys_of.setdefault(path, keys)
    out: dict = {}
    for path in sorted(keys_of):
        set_path(out, keys_of[path], _node_stacked(path, [p.get(path) for p in per], rank))
    return out


def unstack(stacked: Any) -> list[Any]:
    """The K adapters of a stacked tree (the inverse of :func:`stack`, bitwise): slot ``k``'s arrays,
    ranks un-padded, over the kernels adapter ``k`` targets. Works on gradients of a stacked tree too."""
    outs: list[dict] = [{} for _ in range(stack_size(stacked))]
    for _, keys, node in _keyed_nodes(stacked):
        lay = node.layout
        for k, m in enumerate(node.method.methods):
            if m is None:
                continue
            arrays = {}
            for name, spec in m.arrays.items():
                arr = jnp.take(node.params[name], k, axis=lay.stack)
                idx = [slice(None)] * arr.ndim
                for i, ax in enumerate(spec.axes):
                    if ax == RANK:
                        idx[lay.stack + i] = slice(0, m.rank)
                arrays[name] = arr[tuple(idx)]
            shared = node.shared if m.shared_arrays else None
            set_path(outs[k], keys, AdapterParams(arrays, m, lay, node.shape, node.dtype, shared))
    return outs


def _keyed_nodes(adapter: Any) -> list[tuple[str, list[Any], AdapterParams]]:
    """``[(path, keys, node)]`` of an adapter tree (``keys``: the dict keys leading to the node)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=lambda x: isinstance(x, AdapterParams))
    nodes = adapter_nodes(adapter)          # checks every leaf is a node, paths unambiguous
    return [(path, [key_value(x) for x in keys], node) for (keys, _), (path, node) in zip(flat, nodes)]


def stack_size(stacked: Any) -> int:
    """K, the number of adapters of a stacked tree (``TypeError`` if some node is not stacked)."""
    ks = set()
    for path, node in adapter_nodes(stacked):
        if not is_stacked(node.method):
            raise TypeError(f"{path}: not a stacked adapter node ({type(node.method).__name__}); "
                            "make one with lowrank_jax.stack([...])")
        ks.add(node.method.k)
    if len(ks) != 1:
        raise ValueError(f"stacked adapter nodes hold different numbers of adapters: {sorted(ks)}")
    return ks.pop()


def check_adapter_ids(adapter: Any, adapter_ids: Any, where: str) -> Array | None:
    """Validate ``adapter_ids`` against ``adapter``; the ids as an int32 array (``None`` for a plain adapter)."""
    nodes = adapter_nodes(adapter) if adapter else []
    stacked = [p for p, n in nodes if is_stacked(n.method)]
    if adapter_ids is None:
        if stacked:
            raise ValueError(f"{where}: the adapter is stacked (lowrank_jax.stack): pass adapter_ids=ids, one adapter "
                             f"index per example (-1: the base); stacked kernels include {stacked[:3]}")
        return None
    plain = [(p, n) for p, n in nodes if not is_stacked(n.method)]
    if not nodes or plain:
        what = f"{plain[0][0]} is a plain {type(plain[0][1].method).__name__} node" if plain else "there is no adapter"
        raise ValueError(f"{where}: adapter_ids go with a stacked adapter (lowrank_jax.stack); {what}")
    k = stack_size(adapter)
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{where}: adapter_ids must be a 1-D integer array (one adapter index per example), "
                         f"got shape {ids.shape} dtype {ids.dtype}")
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)
        bad = bad[(bad < -1) | (bad >= k)]
        if bad.size:
            raise ValueError(f"{where}: adapter_ids must lie in [-1, {k}) for {k} stacked adapters, got {bad[:5].tolist()}")
    return ids.astype(jnp.int32)

