"""Many runs, one compile: train ``K`` adapters on one frozen base in one jitted, ``vmap``ped step.

A sweep over seeds, learning rates or ranks trains ``K`` independent adapters against the *same*
frozen model. :func:`stack_runs` stacks them along a new leading axis (padding ranks with exact zeros)
and :func:`make_sweep_step` builds one ``jax.jit``-compiled step that ``vmap``s the loss, gradient and
optimizer update over that axis while the frozen tree and the batch are shared (unbatched, closed
over — never copied ``K`` times)::

    runs = lj.sweep.stack_runs([adapter_0, adapter_1, adapter_2])        # (K, ...) arrays
    sweep = lj.sweep.make_sweep_step(model, loss_fn, optax.adam, learning_rates=[1e-3, 3e-3, 1e-2])
    opt_states = sweep.init(runs)
    runs, opt_states, losses = sweep.step(runs, opt_states, frozen, batch, keys)   # losses: (K,)
    adapters = lj.sweep.unstack_runs(runs)                                # K ordinary adapters

Run ``k`` of the sweep computes what ``lj.train.make_train_step`` computes for ``adapter_k`` alone
(the tests check every run against its own sequential training to 1e-5).

**Mixed ranks.** LoRA/DoRA adapters of ranks ``r_k`` are padded to ``R = max r_k`` with zeros in the
columns ``A[:, r_k:]`` and rows ``B[r_k:, :]``. Then ``A@B`` is unchanged, and the padded entries get
exactly zero gradient: ``∂L/∂A[:, j] = s·G·B[j, :]ᵀ = 0`` and ``∂L/∂B[j, :] = s·A[:, j]ᵀ·G = 0`` for
``j ≥ r_k`` (``G`` the gradient w.r.t. the layer's effective weight; DoRA's column norm has the same
structure). Optimizers keep zero-gradient entries at zero only if they add nothing to them (Adam,
SGD, weight decay of a zero entry all do), so the step also masks the updates of padded entries: they
stay exactly zero whatever the optimizer.

**Per-run scaling.** LoRA's ``s_k = α_k / r_k`` (``α_k / √r_k`` with rsLoRA) differs between runs,
but the stacked adapter has one method (rank ``R``, scale ``s_R``) in its static tree structure. Each
run carries ``c_k = s_k / s_R`` (``Runs.scale``) and the forward pass uses ``B_eff = c_k · B``, so
``s_R · A @ B_eff = s_k · A @ B`` and the chain rule gives ``∂L/∂B = c_k · ∂L/∂B_eff``: the stored
``A``, ``B`` receive exactly the rank-``r_k`` run's gradients. (Folding ``c_k`` into the stored ``B``
once would change the parametrisation and thus the optimizer's trajectory — Adam's step size does not
scale with the parameter — so it would not reproduce the rank-``r_k`` run.)

**Per-run learning rates.** ``optimizer`` is then a factory ``learning_rate -> GradientTransformation``
(``optax.adam``, ``lambda lr: optax.adamw(lr, weight_decay=0.01)``, ``lambda lr: lj.train.loraplus(
optax.adam, lr)``), wrapped in ``optax.inject_hyperparams`` so that each run's rate lives in its own
(stacked) optimizer state.

Runs must share the frozen tree: PiSSA (whose frozen tree depends on rank and α) can only be swept over
seeds and learning rates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.paths import path_str

Array = jax.Array

__all__ = ["Runs", "SweepStep", "make_sweep_step", "stack_runs", "unstack_runs"]


def _is_node(x: Any) -> bool:
    return isinstance(x, AdapterParams)


def _nodes(adapter: Any, what: str) -> list[tuple[str, AdapterParams]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_node)
    out = []
    for keys, node in flat:
        path = path_str(keys)
        if not isinstance(node, AdapterParams):
            raise TypeError(f"{what}: leaf at {path!r} is a {type(node).__name__}, not an AdapterParams node")
        out.append((path, node))
    return out


def _map_nodes(fn: Callable[[str, AdapterParams], AdapterParams], adapter: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda keys, node: fn(path_str(keys), node), adapter, is_leaf=_is_node)


def _is_low_rank(node: AdapterParams) -> bool:
    """LoRA/DoRA: ``ΔW``'s low-rank part is ``s·A@B``, so ranks may be zero-padded and scales vary per run."""
    from lowrank_jax import DoRA, LoRA
    return isinstance(node.method, (LoRA, DoRA)) and "a" in node.params and "b" in node.params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Runs:
    """``K`` adapters stacked for one sweep (a pytree; pass it to the sweep step as is).

    Attributes:
      adapter: the adapter tree with a leading ``K`` axis on every array; each node's method is the
        padded one (rank ``R`` = the largest rank at that path).
      scale: ``{path: (K,) float32}`` — ``c_k = s_k / s_R`` for each LoRA/DoRA path (1 when unpadded).
      rank: ``{path: (K,) int32}`` — each run's own rank at each LoRA/DoRA path.
      methods: static ``((path, (method_1, …, method_K)), …)``: each run's own method, for
        :func:`unstack_runs`.
    """

    adapter: Any
    scale: dict[str, Array]
    rank: dict[str, Array]
    methods: tuple = dataclasses.field(metadata=dict(static=True))

    @property
    def k(self) -> int:
        """Number of runs ``K``."""
        return len(self.methods[0][1]) if self.methods else 0


def _compatible(m: Any, ref: Any, rank: int) -> bool:
    """``m`` equals ``ref`` up to rank, alpha, rsLoRA and init (all of which the sweep handles per run)."""
    if type(m) is not type(ref):
        return False
    try:
        return dataclasses.replace(m, rank=rank, alpha=ref.alpha, rslora=ref.rslora, init=ref.init) == ref
    except (TypeError, ValueError):
        return m == ref


def stack_runs(adapters: Sequence[Any]) -> Runs:
    """Stack ``K`` adapters (same paths, layouts and method kind) into one :class:`Runs` pytree.

    LoRA/DoRA runs may differ in ``rank``, ``alpha``, ``rslora`` and ``init``: factors are zero-padded to
    the largest rank ``R`` at each path (``A (…, in, R)``, ``B (…, R, out)``) and each run keeps its own
    scale as ``c_k = s_k / s_R`` (see the module docstring). Everything else — method type, targets,
    dropout, DoRA's ``detach_norm``, NF4 settings, VeRA's projections — must be equal, as must each
    kernel's layout, shape and dtype: the runs share one frozen tree.

    Raises:
      ValueError naming the run, the path and both values on any mismatch.
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("stack_runs: got no adapters")
    per_run = [_nodes(a, f"stack_runs: run {k}") for k, a in enumerate(adapters)]
    paths = [p for p, _ in per_run[0]]
    for k, nodes in enumerate(per_run[1:], 1):
        if [p for p, _ in nodes] != paths:
            raise ValueError(f"stack_runs: run {k} adapts paths {[p for p, _ in nodes]}, run 0 adapts {paths}")

    padded_method: dict[str, Any] = {}
    scale: dict[str, Array] = {}
    rank: dict[str, Array] = {}
    methods = []
    for i, path in enumerate(paths):
        nodes = [nodes_k[i][1] for nodes_k in per_run]
        n0 = nodes[0]
        for k, n in enumerate(nodes[1:], 1):
            for attr in ("layout", "shape", "dtype", "shared"):
                if getattr(n, attr) != getattr(n0, attr):
                    raise ValueError(f"stack_runs: {path}: run {k} has {attr} {getattr(n, attr)!r}, "
                                     f"run 0 has {getattr(n0, attr)!r}; runs must share one frozen tree")
            if sorted(n.params) != sorted(n0.params):
                raise ValueError(f"stack_runs: {path}: run {k} has arrays {sorted(n.params)}, "
                                 f"run 0 has {sorted(n0.params)}")
        methods.append((path, tuple(n.method for n in nodes)))
        if all(_is_low_rank(n) for n in nodes):
            ranks = [int(n.params["a"].shape[-1]) for n in nodes]
            big = max(ranks)
            ref = nodes[ranks.index(big)].method
            for k, n in enumerate(nodes):
                if not _compatible(n.method, ref, big):
                    raise ValueError(f"stack_runs: {path}: run {k} uses {n.method!r}, which differs from "
                                     f"{ref!r} in more than rank/alpha/rslora/init; such runs cannot share a step")
                if getattr(n.method, "init", None) == "pissa" and n.method != ref:
                    raise ValueError(f"stack_runs: {path}: run {k} uses PiSSA with {n.method!r} but another run "
                                     f"uses {ref!r}; PiSSA's frozen tree depends on rank and alpha, so these "
                                     "runs do not share a frozen base")
            padded_method[path] = ref
            scale[path] = jnp.asarray([n.method.scaling / ref.scaling for n in nodes], jnp.float32)
            rank[path] = jnp.asarray(ranks, jnp.int32)
        else:
            for k, n in enumerate(nodes):
                if n.method != n0.method:
                    raise ValueError(f"stack_runs: {path}: run {k} uses {n.method!r}, run 0 uses {n0.method!r}")
            padded_method[path] = n0.method

    def pad(path: str, node: AdapterParams) -> AdapterParams:
        p = dict(node.params)
        if path in rank:
            extra = padded_method[path].rank - p["a"].shape[-1]
            a, b = jnp.asarray(p["a"]), jnp.asarray(p["b"])
            p["a"] = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])
            p["b"] = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, extra), (0, 0)])
        return AdapterParams(p, padded_method[path], node.layout, node.shape, node.dtype, node.shared)

    padded = [_map_nodes(pad, a) for a in adapters]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *padded)
    return Runs(stacked, scale, rank, tuple(methods))


def unstack_runs(runs: Runs) -> list[Any]:
    """The ``K`` ordinary adapters of ``runs``, each with its own method and rank (padding removed)."""
    own = dict(runs.methods)
    out = []
    for k in range(runs.k):
        one = jax.tree_util.tree_map(lambda x: x[k], runs.adapter)

        def restore(path: str, node: AdapterParams) -> AdapterParams:
            p = dict(node.params)
            if path in runs.rank:
                r = int(runs.rank[path][k])
                p["a"], p["b"] = p["a"][..., :r], p["b"][..., :r, :]
            return AdapterParams(p, own[path][k], node.layout, node.shape, node.dtype, node.shared)

        out.append(_map_nodes(restore, one))
    return out


def _scaled(adapter: Any, scale: dict[str, Array]) -> Any:
    """The adapter the forward pass sees: ``B_eff = c · B`` at each LoRA/DoRA path."""
    return _map_nodes(lambda path, n: n.replace(b=n.params["b"] * scale[path]) if path in scale else n, adapter)


def _mask_padding(updates: Any, rank: dict[str, Array]) -> Any:
    """Zero the updates of padded factor entries (columns ``≥ r`` of ``A``, rows ``≥ r`` of ``B``)."""
    def mask(path: str, u: AdapterParams) -> AdapterParams:
        if path not in rank:
            return u
        live = jnp.arange(u.params["a"].shape[-1]) < rank[path]
        return u.replace(a=jnp.where(live, u.params["a"], 0), b=jnp.where(live[:, None], u.params["b"], 0))
    return _map_nodes(mask, updates)


class SweepStep(NamedTuple):
    """``step``, ``init`` and ``loss`` of a sweep (see :func:`make_sweep_step`)."""

    step: Callable
    init: Callable
    loss: Callable


def make_sweep_step(model: Any, loss_fn: Callable, optimizer: Any, *, learning_rates: Sequence[float] | None = None,
                    per_run_batch: bool = False, runs_per_batch: int | None = None, factored: bool = True,
                    donate: bool = True, custom_layers: Any = None, adapter_dtype: Any = None) -> SweepStep:
    """One jitted step that trains all ``K`` runs of a :class:`Runs` at once.

    Args:
      model: a linen module; loss_fn: ``loss_fn(run, batch) -> scalar`` as for
        :func:`lowrank_jax.train.make_train_step`.
      optimizer: an optax ``GradientTransformation`` used by every run, or — with ``learning_rates`` —
        a factory ``learning_rate -> GradientTransformation``.
      learning_rates: one learning rate per run (``K`` values): run ``k`` trains with
        ``optimizer(learning_rates[k])`` (through ``optax.inject_hyperparams``).
      per_run_batch: ``False`` (default): every run sees the same ``batch`` (shared, unbatched);
        ``True``: every batch leaf has a leading ``K`` axis, run ``k`` sees slice ``k``.
      runs_per_batch: ``None`` (default): ``vmap`` over all ``K`` runs at once. An integer ``b``:
        ``jax.lax.map(..., batch_size=b)`` — ``vmap`` over ``b`` runs at a time inside a compiled loop
        (``b = 1``: the runs one after another). Same results and still one compile, with a ``K/b``
        times smaller working set: for sweeps whose ``K``-wide batch does not fit in memory. (On
        the 2-core CPU of ``benchmarks/k_runs.py`` neither form beat ``K`` sequential runs per step;
        the sweep saves the compiles of learning-rate and rank sweeps.)
      factored, custom_layers, adapter_dtype: as for :func:`lowrank_jax.train.make_train_step`.
      donate: donate the runs and optimizer states to the step.

    Returns:
      ``SweepStep(step, init, loss)``:
      ``init(runs) -> opt_states`` (stacked along ``K``);
      ``step(runs, opt_states, frozen, batch, keys=None) -> (runs, opt_states, losses)`` — ``keys``:
      ``None`` (no dropout) or ``K`` PRNG keys, one per run; ``losses``: ``(K,)``, before the update;
      ``loss(runs, frozen, batch, keys=None) -> (K,)`` the losses without an update (jitted).
    """
    from lowrank_jax import apply, merge

    if learning_rates is None:
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(f"make_sweep_step: optimizer must be an optax GradientTransformation, got {optimizer!r} "
                            "(pass learning_rates=[...] to give a factory learning_rate -> GradientTransformation)")
        lrs = None
        tx = optimizer
    else:
        if not callable(optimizer) or hasattr(optimizer, "update"):
            raise TypeError("make_sweep_step: with learning_rates, optimizer must be a factory "
                            f"learning_rate -> GradientTransformation (e.g. optax.adam), got {optimizer!r}")
        lrs = np.asarray(learning_rates, np.float32)
        if lrs.ndim != 1 or lrs.size == 0 or not np.all(np.isfinite(lrs)):
            raise ValueError(f"make_sweep_step: learning_rates must be a non-empty 1-D list of finite numbers, "
                             f"got {learning_rates!r}")

        def factory(learning_rate):
            return optimizer(learning_rate)

        injected = optax.inject_hyperparams(factory)
        tx = injected(learning_rate=float(lrs[0]))   # its update reads each run's rate from the state

    if runs_per_batch is not None and (isinstance(runs_per_batch, bool) or not isinstance(runs_per_batch, int)
                                       or runs_per_batch < 1):
        raise ValueError(f"make_sweep_step: runs_per_batch must be None or an integer >= 1, got {runs_per_batch!r}")

    def over_runs(fn, *args, in_axes):
        """``fn`` applied to each run: ``vmap`` over all, or ``lax.map`` in batches of ``runs_per_batch``."""
        if runs_per_batch is None:
            return jax.vmap(fn, in_axes=in_axes)(*args)
        mapped = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

        def per_run(xs):
            it = iter(xs)
            return fn(*[next(it) if ax == 0 else a for a, ax in zip(args, in_axes)])
        return jax.lax.map(per_run, mapped, batch_size=runs_per_batch)

    def one_loss(adapter, scale, frozen, batch, key):
        eff = _scaled(adapter, scale)
        if factored:
            def run(*args, **kwargs):
                return apply(model, {"params": frozen}, eff, *args, dropout_key=key,
                             custom_layers=custom_layers, adapter_dtype=adapter_dtype, **kwargs)
        else:
            def run(*args, **kwargs):
                return model.apply({"params": merge(frozen, eff)}, *args, **kwargs)
        return loss_fn(run, batch)

    def axes(keys):
        return 0 if keys is not None else None, 0 if per_run_batch else None

    def init(runs: Runs) -> Any:
        if lrs is None:
            return jax.vmap(tx.init)(runs.adapter)
        if lrs.size != runs.k:
            raise ValueError(f"make_sweep_step: {lrs.size} learning_rates for {runs.k} runs")
        return jax.vmap(lambda ad, lr: injected(learning_rate=lr).init(ad))(runs.adapter, jnp.asarray(lrs))

    def step(runs: Runs, opt_states: Any, frozen: Any, batch: Any, keys: Array | None = None):
        if keys is not None and not factored:
            raise ValueError("make_sweep_step: adapter dropout needs the factored path; with factored=False "
                             "pass keys=None")

        def one(adapter, scale, rank, opt_state, key, b):
            value, grads = jax.value_and_grad(one_loss)(adapter, scale, frozen, b, key)
            updates, opt_state = tx.update(grads, opt_state, adapter)
            updates = _mask_padding(updates, rank)
            return optax.apply_updates(adapter, updates), opt_state, value

        k_ax, b_ax = axes(keys)
        adapter, opt_states, losses = over_runs(one, runs.adapter, runs.scale, runs.rank, opt_states, keys, batch,
                                                in_axes=(0, 0, 0, 0, k_ax, b_ax))
        return Runs(adapter, runs.scale, runs.rank, runs.methods), opt_states, losses

    def loss(runs: Runs, frozen: Any, batch: Any, keys: Array | None = None) -> Array:
        k_ax, b_ax = axes(keys)
        return over_runs(lambda ad, sc, key, b: one_loss(ad, sc, frozen, b, key), runs.adapter, runs.scale, keys,
                         batch, in_axes=(0, 0, k_ax, b_ax))

    return SweepStep(jax.jit(step, donate_argnums=(0, 1) if donate else ()), init, jax.jit(loss))
