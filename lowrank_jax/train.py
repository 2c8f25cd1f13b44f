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
import jax.numpy as jnp
import optax

from lowrank_jax.tree import merge

Array = jax.Array


def masked(tx: optax.GradientTransformation, trainable_key: str = "adapter") -> optax.GradientTransformation:
    """Apply ``tx`` to ``tree[trainable_key]`` only; every other top-level entry gets zero updates.

    The frozen part has no optimizer state (``optax.multi_transform`` with ``set_to_zero``).

    Example:
      >>> tx = lowrank_jax.train.masked(optax.adam(1e-3))
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
    def node_labels(path, leaf):
        name = getattr(path[-1], "name", None) if path else None
        return "fast" if name == "b" or jnp.ndim(leaf) == 1 or (name or "").startswith("lambda") else "slow"

    return jax.tree_util.tree_map_with_path(node_labels, adapter)


def loraplus(optimizer: Callable[..., optax.GradientTransformation], learning_rate: float | optax.Schedule,
             ratio: float = 16.0, **optimizer_kwargs) -> optax.GradientTransformation:
    """LoRA+: ``optimizer(learning_rate)`` for ``A``, ``optimizer(ratio · learning_rate)`` for ``B``.

    ``B`` factors and 1-D vectors (DoRA's ``m``, VeRA's ``λ``) form the fast group, as in PEFT's
    ``create_loraplus_optimizer``; everything else (``A``) the slow one.

    Example:
      >>> tx = lowrank_jax.train.loraplus(optax.adamw, 2e-4, ratio=16.0, weight_decay=0.0)
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


def make_train_step(model: Any, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    factored: bool = True, donate: bool = True, custom_layers: Any = None,
                    adapter_dtype: Any = None) -> TrainStep:
    """Build a jitted train step that updates only the adapter.

    Args:
      model: a linen module.
      loss_fn: ``loss_fn(run, batch) -> scalar``; ``run(*args, **kwargs)`` is ``model.apply`` with the
        adapters (``run(batch["x"])``; pass ``rngs=`` etc. through it).
      optimizer: an optax transformation; its state covers the adapter only.
      factored: run adapters inside the layers (:func:`lowrank_jax.apply`; default) or merge the
        weights first (``False``: costs as much as full fine-tuning, kept for comparison).
      donate: donate the adapter and optimizer-state buffers to the step.

    Returns:
      ``TrainStep(step, init, loss)``: ``init(adapter) -> opt_state``;
      ``step(adapter, opt_state, frozen, batch, key=None) -> (adapter, opt_state, loss)`` where ``key``
      drives adapter dropout; ``loss(adapter, frozen, batch, key=None)`` the same loss, un-jitted.
    """
    from lowrank_jax.execution.linen import apply

    def loss(adapter, frozen, batch, key=None):
        if factored:
            def run(*args, **kwargs):
                return apply(model, {"params": frozen}, adapter, *args, dropout_key=key,
                             custom_layers=custom_layers, adapter_dtype=adapter_dtype, **kwargs)
        else:
            def run(*args, **kwargs):
                return model.apply({"params": merge(frozen, adapter)}, *args, **kwargs)
        return loss_fn(run, batch)

    def step(adapter, opt_state, frozen, batch, key=None):
        value, grads = jax.value_and_grad(loss)(adapter, frozen, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return TrainStep(jitted, optimizer.init, loss)

