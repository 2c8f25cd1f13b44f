"""Factored execution: adapters applied inside Flax layers (linen interception, NNX)."""

from lowrank_jax.execution import nnx
from lowrank_jax.execution.linen import LayerSpec, apply, discover

__all__ = ["LayerSpec", "apply", "discover", "nnx"]
