"""Methods: the math of one adapted weight matrix (LoRA, DoRA, VeRA, DVoRA)."""

from lowrank_jax.methods.base import ArraySpec, FrozenInputs, Method, count_matrix_params
from lowrank_jax.methods.dvora import DVoRA
from lowrank_jax.methods.lora import DoRA, LoRA, column_norm
from lowrank_jax.methods.vera import VeRA, vera_projections

__all__ = ["ArraySpec", "DVoRA", "FrozenInputs", "Method", "LoRA", "DoRA", "VeRA", "column_norm", "count_matrix_params", "vera_projections"]
