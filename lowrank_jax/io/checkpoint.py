"""Training checkpoints of adapter + optimizer state + PRNG state, with orbax-checkpoint.

:class:`TrainCheckpointer` wraps an ``orbax.checkpoint.CheckpointManager``. Each step directory holds
two orbax items:

* ``state`` (``StandardSave``): a *plain* dict of arrays —
  ``{"adapter": {"node_0000": {"a": …, "b": …}, …}, "opt_state": {"leaf_00000": …, …}, "rng": uint32[…]}``.
  ``AdapterParams`` and optax's named tuples are custom pytree nodes, so they are flattened to
  index-named dicts that any orbax version stores;
* ``meta`` (``JsonSave``): the step's description — the adapter nodes exactly as in ``adapter.json``
  (method class and fields, layout, kernel shape/dtype, shared name, array shapes), the
  ``/``-joined path, shape and dtype of every optimizer-state leaf, the PRNG kind (typed key with its
  implementation name, or raw ``uint32`` key data), and the user's JSON ``extra``.

The frozen base is never saved. Restoring needs ``*_like`` trees (concrete arrays or
``jax.ShapeDtypeStruct`` with ``sharding``) and restores each array straight onto the sharding of its
counterpart (orbax ``StandardRestore`` with abstract arrays), then rebuilds the original tree
structures from the ``*_like`` tree definitions. Structure, shape and dtype mismatches are reported with
the offending path before any array is read.

Atomicity is orbax's: a step is written into a temporary directory and renamed into place only
when complete (plus a ``commit_success`` marker on object stores); unfinished temporary directories
are never listed by :meth:`TrainCheckpointer.all_steps`, never restored, and are deleted when the next
``TrainCheckpointer`` opens the directory.

Example::

    ckpt = lowrank_jax.io.TrainCheckpointer("/tmp/run1", max_to_keep=3)
    ckpt.save(step, adapter, opt_state, rng=key, extra={"epoch": 2})
    …
    step, adapter, opt_state, key, extra = ckpt.restore(adapter_like=adapter0, opt_state_like=opt_state0)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lowrank_jax.io import _format as fmt
from lowrank_jax.tree import path_str

__all__ = ["TrainCheckpointer"]

_META_FORMAT = "lowrank_jax.train_checkpoint"


def _leaf_abstract(x: Any, default_sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        if getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default_sharding)
        return x
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError("typed PRNG keys inside the optimizer state are not supported")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    arr = np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=default_sharding)


def _describe_leaves(tree: Any) -> tuple[list[dict[str, Any]], list[Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    desc = [{"path": path_str(p), "shape": [int(s) for s in np.shape(v)],
             "dtype": fmt.dtype_name(getattr(v, "dtype", np.asarray(v).dtype))} for p, v in leaves]
    return desc, [v for _, v in leaves], treedef


class TrainCheckpointer:
    """Save/restore ``(step, adapter, opt_state, rng, extra)`` under ``directory`` with orbax.

    Args:
      directory: root of the step directories (created if missing).
      max_to_keep: keep only the newest this-many steps (``None``: keep all).
      async_save: let orbax write in a background thread (call :meth:`wait_until_finished` before
        reading the files); default ``False``: :meth:`save` returns when the step is committed.
      options: extra keyword arguments for ``ocp.CheckpointManagerOptions``.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, *, async_save: bool = False,
                 **options: Any):
        self.directory = Path(directory).absolute()
        self._async = bool(async_save)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, **options)
        self._manager = ocp.CheckpointManager(self.directory, options=opts)

    # ----------------------------------------------------------------------------------- listing
    def all_steps(self) -> list[int]:
        """Committed steps, ascending (unfinished temporary directories are ignored)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest committed step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ----------------------------------------------------------------------------------- save
    def save(self, step: int, adapter: Any, opt_state: Any, *, rng: jax.Array | None = None,
             extra: Mapping[str, Any] | None = None) -> None:
        """Write step ``step``: adapter arrays + description, optimizer state, ``rng`` and ``extra``.

        ``rng`` may be a typed key (``jax.random.key``) or raw ``uint32`` key data
        (``jax.random.PRNGKey``); it is restored in the same form. ``extra`` must be JSON-serializable
        (data-loader position, epoch, metrics …).
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"TrainCheckpointer.save: step must be an integer >= 0, got {step!r}")
        step = int(step)
        nodes, _ = fmt.describe_adapter(adapter, with_arrays=False)
        adapter_arrays = _adapter_arrays(adapter)
        opt_desc, opt_leaves, _ = _describe_leaves(opt_state)
        state: dict[str, Any] = {
            "adapter": adapter_arrays,
            "opt_state": {f"leaf_{i:05d}": v for i, v in enumerate(opt_leaves)},
        }
        rng_desc: dict[str, Any] | None = None
        if rng is not None:
            if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
                state["rng"] = jax.random.key_data(rng)
                rng_desc = {"typed": True, "impl": str(jax.random.key_impl(rng)),
                            "data_shape": list(state["rng"].shape)}
            else:
                arr = rng if isinstance(rng, jax.Array) else np.asarray(rng)
                if arr.dtype != np.uint32:
                    raise TypeError(f"TrainCheckpointer.save: rng must be a typed key or uint32 key data, "
                                    f"got dtype {arr.dtype}")
                rng_desc = {"typed": False, "data_shape": list(arr.shape)}
                state["rng"] = arr
        try:
            import json
            extra_json = json.loads(json.dumps(dict(extra or {}), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"TrainCheckpointer.save: extra must be JSON-serializable: {e}") from None
        meta = {
            "format": _META_FORMAT,
            "version": fmt.FORMAT_VERSION,
            "step": step,
            "adapter_nodes": nodes,
            "opt_state": opt_desc,
            "rng": rng_desc,
            "extra": extra_json,
        }
        # Empty dicts are dropped by some orbax versions; keep the tree non-degenerate.
        if not state["opt_state"]:
            state.pop("opt_state")
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if not self._async:
            self._manager.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    # ----------------------------------------------------------------------------------- restore
    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON description of ``step`` (default: latest)."""
        step = self._resolve(step)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
            raise ValueError(f"{self.directory}/{step}: not a lowrank_jax training checkpoint")
        return meta

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory}: no committed checkpoint")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"{self.directory}: no committed checkpoint for step {step} (have {steps})")
        return int(step)

    def restore(self, step: int | None = None, *, adapter_like: Any = None, opt_state_like: Any = None,
                ) -> tuple[int, Any, Any, jax.Array | None, dict[str, Any]]:
        """Load ``(step, adapter, opt_state, rng, extra)`` (``step=None``: the latest committed one).

        Args:
          adapter_like: an adapter of the same structure (arrays or ``jax.ShapeDtypeStruct`` with
            ``sharding``): each restored array is placed on its counterpart's sharding, and the saved
            description must equal this one's (method, layout, shapes, dtypes). ``None``: rebuild the
            adapter from the saved description on the default device.
          opt_state_like: the optimizer state's structure (e.g. ``tx.init(adapter_like)`` or its
            ``jax.eval_shape``); ``None`` skips the optimizer state (returned as ``None``).

        Returns:
          ``(step, adapter, opt_state, rng, extra)``; ``rng`` in the form it was saved (typed key or
          ``uint32`` data), ``None`` if none was saved.
        """
        step = self._resolve(step)
        meta = self.read_meta(step)
        where = f"{self.directory}/{step}"
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        # ---- adapter: validate against adapter_like, build abstract targets.
        saved_nodes = meta["adapter_nodes"]
        if adapter_like is not None:
            like_nodes, _ = fmt.describe_adapter(adapter_like, with_arrays=False)
            _compare_nodes(saved_nodes, like_nodes, where)
            like_arrays = _adapter_arrays(adapter_like)
            abstract_adapter = jax.tree_util.tree_map(lambda x: _leaf_abstract(x, default), like_arrays)
        else:
            abstract_adapter = {}
            for i, d in enumerate(saved_nodes):
                abstract_adapter[f"node_{i:04d}"] = {
                    name: jax.ShapeDtypeStruct(tuple(spec["shape"]), np.dtype(_np_dtype(spec["dtype"])),
                                               sharding=default)
                    for name, spec in d["arrays"].items()}
        target: dict[str, Any] = {"adapter": abstract_adapter}

        # ---- optimizer state.
        opt_treedef = None
        if opt_state_like is not None:
            like_desc, like_leaves, opt_treedef = _describe_leaves(opt_state_like)
            saved_desc = meta["opt_state"]
            if len(like_desc) != len(saved_desc):
                raise ValueError(f"{where}: the saved optimizer state has {len(saved_desc)} arrays, "
                                 f"opt_state_like has {len(like_desc)}")
            for s, l in zip(saved_desc, like_desc):
                if s != l:
                    raise ValueError(f"{where}: optimizer state leaf {s['path']!r} was saved as "
                                     f"{s['dtype']}{s['shape']}, opt_state_like has {l['path']!r} "
                                     f"{l['dtype']}{l['shape']}")
            if like_leaves:
                target["opt_state"] = {f"leaf_{i:05d}": _leaf_abstract(v, default)
                                       for i, v in enumerate(like_leaves)}
        elif meta["opt_state"]:
            # orbax restores whole items: read the optimizer state onto the default device and drop it.
            target["opt_state"] = {
                f"leaf_{i:05d}": jax.ShapeDtypeStruct(tuple(d["shape"]), _np_dtype(d["dtype"]), sharding=default)
                for i, d in enumerate(meta["opt_state"])}
        rng_desc = meta.get("rng")
        if rng_desc is not None:
            target["rng"] = jax.ShapeDtypeStruct(tuple(rng_desc["data_shape"]), np.uint32, sharding=default)

        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        state = out["state"]

        # ---- rebuild trees.
        arrays = state["adapter"]
        if adapter_like is not None:
            adapter = _fill_like(adapter_like, arrays)
        else:
            def fetch(tname, spec, pstr, name, _idx={d["arrays"][n]["tensor"]: (i, n)
                                                     for i, d in enumerate(saved_nodes) for n in d["arrays"]}):
                i, n = _idx[tname]
                return arrays[f"node_{i:04d}"][n]
            adapter = fmt.build_adapter(saved_nodes, fetch, where)
        opt_state = None
        if opt_treedef is not None:
            leaves = [state["opt_state"][f"leaf_{i:05d}"] for i in range(opt_treedef.num_leaves)] \
                if opt_treedef.num_leaves else []
            opt_state = jax.tree_util.tree_unflatten(opt_treedef, leaves)
        rng = None
        if rng_desc is not None:
            rng = state["rng"]
            if rng_desc["typed"]:
                rng = jax.random.wrap_key_data(rng, impl=rng_desc["impl"])
        return step, adapter, opt_state, rng, meta.get("extra", {})

    # ----------------------------------------------------------------------------------- misc
    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _np_dtype(name: str) -> Any:
    import jax.numpy as jnp
    return jnp.dtype(name)


def _adapter_arrays(adapter: Any) -> dict[str, dict[str, Any]]:
    """``{"node_0000": {"a": …, "b": …}, …}`` in :func:`describe_adapter`'s node order."""
    from lowrank_jax.adapter import AdapterParams

    out: dict[str, dict[str, Any]] = {}

    def walk(tree: Any) -> None:
        if isinstance(tree, AdapterParams):
            out[f"node_{len(out):04d}"] = dict(tree.params)
        elif isinstance(tree, dict):
            for k in tree:
                walk(tree[k])
        else:
            raise TypeError(f"adapter: expected nested dicts of AdapterParams, found {type(tree).__name__}")

    walk(adapter)
    return out


def _fill_like(adapter_like: Any, arrays: Mapping[str, Mapping[str, Any]]) -> Any:
    """``adapter_like`` with its arrays replaced by ``arrays`` (same node numbering as :func:`_adapter_arrays`)."""
    from lowrank_jax.adapter import AdapterParams

    counter = [0]

    def walk(tree: Any) -> Any:
        if isinstance(tree, AdapterParams):
            got = arrays[f"node_{counter[0]:04d}"]
            counter[0] += 1
            return tree.replace(**{k: got[k] for k in tree.params})
        return {k: walk(v) for k, v in tree.items()}

    return walk(adapter_like)


def _compare_nodes(saved: list[dict], like: list[dict], where: str) -> None:
    if len(saved) != len(like):
        raise ValueError(f"{where}: the checkpoint has {len(saved)} adapter nodes, adapter_like has {len(like)}")
    for s, l in zip(saved, like):
        if s != l:
            p = "/".join(map(str, s.get("path", [])))
            diff = sorted(k for k in set(s) | set(l) if s.get(k) != l.get(k))
            raise ValueError(f"{where}: adapter node {p!r} differs from adapter_like in {diff}: saved "
                             f"{ {k: s.get(k) for k in diff} } vs { {k: l.get(k) for k in diff} }")
