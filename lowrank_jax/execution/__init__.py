"""Factored execution: adapters applied inside Flax layers (linen interception, NNX)."""

from lowrank_jax.execution import nnx
from lowrank_jax.execution.linen import DORA_PRE_SCALE, LayerSpec, apply, discover

__all__ = ["DORA_PRE_SCALE", "LayerSpec", "apply", "discover", "nnx"]
