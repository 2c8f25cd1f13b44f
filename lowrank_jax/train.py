"""Training helpers: optax masking for combined trees, LoRA+ learning rates, a jitted train step.

The adapter is its own pytree, so plain optax already trains only it::

    opt_state = tx.init(adapter)
    grads = jax.grad(loss, argnums=0)(adapter, frozen, batch)     # w.r.t. the adapter argument only

These helpers cover the rest:

* :func:`masked` — for users who keep one tree ``{"frozen": ..., "adapter": ...}``: zero updates and no
  optimizer state for the frozen part.
* :func:`loraplus` — LoRA+ (Hayou et al. 2024): the ``B`` factors (and 1-D adapter vectors, as PEFT
  groups them) learn ``ratio`` times faster than ``A``.
* :func:`make_train_step` — ``step(adapter, opt_state, frozen, batch, key)`` compiled with ``jax.jit``,
  adapter and optimizer state donated, factored execution by default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax

from lowrank_jax.adapter import AdapterParams, is_adapter
from lowrank_jax.tree import adapter_nodes, merge

Array = jax.Array


def masked(tx: optax.GradientTransformation, trainable_key: str = "adapter") -> optax.GradientTransformation:
    """Apply ``tx`` to ``tree[trainable_key]`` only; every other top-level entry gets zero updates.

    The frozen part has no optimizer state (``optax.multi_transform`` with ``set_to_zero``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lj
      >>> frozen, adapter = lj.init(lj.LoRA(rank=2), {"d": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0))
      >>> tx = lj.train.masked(optax.adam(1e-3))
      >>> state = tx.init({"frozen": frozen, "adapter": adapter})
    """

    def labels(tree: Mapping[str, Any]) -> Any:
        if not isinstance(tree, Mapping) or trainable_key not in tree:
            raise ValueError(
                f"masked: expected a mapping with a {trainable_key!r} entry, got "
                f"{list(tree) if isinstance(tree, Mapping) else type(tree).__name__}"
            )
        return {k: jax.tree_util.tree_map(lambda _: "train" if k == trainable_key else "freeze", v)
                for k, v in tree.items()}

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def _loraplus_labels(adapter: Any) -> Any:
    def node_labels(node):
        if not isinstance(node, AdapterParams):
            raise TypeError(f"loraplus: expected an adapter tree of AdapterParams nodes, found a {type(node).__name__}")
        declared = node.method.arrays
        return node.replace(**{k: "fast" if declared[k].lr_fast else "slow" for k in node.params})

    return jax.tree_util.tree_map(node_labels, adapter, is_leaf=is_adapter)


def loraplus(optimizer: Callable[..., optax.GradientTransformation], learning_rate: float | optax.Schedule,
             ratio: float = 16.0, **optimizer_kwargs) -> optax.GradientTransformation:
    """LoRA+: ``optimizer(learning_rate)`` for ``A``, ``optimizer(ratio · learning_rate)`` for ``B``.

    Arrays without an ``in`` axis in their method's declaration — ``B`` factors and the 1-D vectors
    (DoRA's ``m``, VeRA's ``λ``) — form the fast group, as in PEFT's ``create_loraplus_optimizer``;
    everything else (``A``) the slow one.

    Example:
      >>> import optax, lowrank_jax as lj
      >>> tx = lj.train.loraplus(optax.adamw, 2e-4, ratio=16.0, weight_decay=0.0)
    """
    if not ratio > 0:
        raise ValueError(f"loraplus: ratio must be > 0, got {ratio!r}")
    fast_lr = (lambda step: ratio * learning_rate(step)) if callable(learning_rate) else ratio * learning_rate
    return optax.multi_transform(
        {"slow": optimizer(learning_rate, **optimizer_kwargs), "fast": optimizer(fast_lr, **optimizer_kwargs)},
        _loraplus_labels,
    )


class TrainStep(NamedTuple):
    """``step(adapter, opt_state, frozen, batch, key=None) -> (adapter, opt_state, loss)`` and friends."""

    step: Callable
    init: Callable
    loss: Callable


class _DonatingStep:
    """The jitted step, called through a check that no argument buffer was consumed by an earlier call."""

    def __init__(self, jitted: Callable, donate: bool):
        self.jitted = jitted
        self.donate = donate

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, adapter, opt_state, *args, **kwargs):
        if self.donate:
            for name, tree in (("adapter", adapter), ("opt_state", opt_state)):
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    if isinstance(leaf, jax.Array) and leaf.is_deleted():
                        raise RuntimeError(
                            f"train step: {name}{jax.tree_util.keystr(p)} was donated to an earlier call of this "
                            "step and its buffer is gone: the step donates the adapter and optimizer state "
                            "(make_train_step(..., donate=True)). Use the adapter and state the step returned, "
                            "copy them first (jax.tree.map(jnp.copy, adapter)), or build the step with donate=False.")
        return self.jitted(adapter, opt_state, *args, **kwargs)


def _check_dropout_merged(adapter: Any, key: Any) -> None:
    if key is None:
        return
    dropped = [p for p, n in adapter_nodes(adapter) if n.method.dropout > 0]
    if dropped:
        raise ValueError(
            f"train step: factored=False merges the weights, so the adapter-input dropout of {dropped[:4]} "
            "cannot be applied; use factored=True (the default) or methods with dropout=0.0")


def make_train_step(model: Any, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    factored: bool = True, donate: bool = True, custom_layers: Any = None,
                    adapter_dtype: Any = None, nan_guard: bool = False, mesh: Any = None,
                    in_shardings: Any = None, out_shardings: Any = None) -> TrainStep:
    """Build a jitted train step that updates only the adapter.

    Args:
      model: a linen module.
      loss_fn: ``loss_fn(run, batch) -> scalar``; ``run(*args, **kwargs)`` is ``model.apply`` with the
        adapters (``run(batch["x"])``; pass ``rngs=`` etc. through it).
      optimizer: an optax transformation; its state covers the adapter only.
      factored: run adapters inside the layers (:func:`lowrank_jax.apply`; default) or merge the
        weights first (``False``: costs as much as full fine-tuning, kept for comparison; adapter
        dropout cannot be expressed there and is an error when a key is passed).
      donate: donate the adapter and optimizer-state buffers to the step (reusing a donated input
        raises an error that says so).
      nan_guard: wrap ``optimizer`` in ``optax.apply_if_finite``: a step whose gradients hold NaN/inf
        leaves the adapter and optimizer state unchanged (the loss is still returned);
        :func:`skipped_steps` reads how many steps were skipped from the optimizer state.
      mesh: run on a ``jax.sharding.Mesh`` with shardings taken from the arguments
        (:class:`lowrank_jax.sharding.PinnedStep`): placed arrays keep their ``NamedSharding``, others
        are replicated; the returned adapter and optimizer state keep the shardings passed in (so
        donation reuses their buffers); ``init`` places the optimizer state like the adapter
        (:func:`lowrank_jax.sharding.opt_state_specs`). ``"auto"``: the mesh the arguments are on.
        ``None`` (default): plain ``jax.jit``, which follows committed inputs.
      in_shardings, out_shardings: passed to ``jax.jit`` as given (for ``(adapter, opt_state, frozen,
        batch, key)`` and ``(adapter, opt_state, loss)``); instead of ``mesh``.

    Returns:
      ``TrainStep(step, init, loss)``: ``init(adapter) -> opt_state``;
      ``step(adapter, opt_state, frozen, batch, key=None) -> (adapter, opt_state, loss)`` where ``key``
      drives adapter dropout; ``loss(adapter, frozen, batch, key=None)`` the same loss, un-jitted.
    """
    from lowrank_jax.execution.linen import apply

    if nan_guard:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=2**31 - 1)

    def loss(adapter, frozen, batch, key=None):
        if factored:
            def run(*args, **kwargs):
                return apply(model, {"params": frozen}, adapter, *args, dropout_key=key,
                             custom_layers=custom_layers, adapter_dtype=adapter_dtype, **kwargs)
        else:
            _check_dropout_merged(adapter, key)

            def run(*args, **kwargs):
                return model.apply({"params": merge(frozen, adapter)}, *args, **kwargs)
        return loss_fn(run, batch)

    def step(adapter, opt_state, frozen, batch, key=None):
        value, grads = jax.value_and_grad(loss)(adapter, frozen, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    if mesh is not None and (in_shardings is not None or out_shardings is not None):
        raise ValueError("make_train_step: pass mesh= (shardings taken from the arguments) or in_shardings=/"
                         "out_shardings=, not both")
    opt_init = optimizer.init
    if mesh is not None:
        from lowrank_jax import sharding
        jitted = sharding.PinnedStep(step, mesh, donate)
        opt_init = sharding.placed_opt_init(optimizer.init, mesh)
    else:
        given = {k: v for k, v in (("in_shardings", in_shardings), ("out_shardings", out_shardings)) if v is not None}
        jitted = jax.jit(step, donate_argnums=(0, 1) if donate else (), **given)
    return TrainStep(_DonatingStep(jitted, donate), opt_init, loss)


def skipped_steps(opt_state: Any) -> int:
    """Steps skipped for non-finite gradients by a ``nan_guard=True`` step (``optax.apply_if_finite``)."""
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)):
        if isinstance(s, optax.ApplyIfFiniteState):
            return int(s.total_notfinite)
    raise ValueError("skipped_steps: this optimizer state has no apply_if_finite state; build the step with "
                     "make_train_step(..., nan_guard=True)")
