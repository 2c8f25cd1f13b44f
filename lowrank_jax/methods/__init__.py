"""Methods: the math of one adapted weight matrix (LoRA, DoRA, VeRA)."""

from lowrank_jax.methods.base import Method, count_matrix_params
from lowrank_jax.methods.lora import DoRA, LoRA, column_norm
from lowrank_jax.methods.vera import VeRA, vera_projections

__all__ = ["Method", "LoRA", "DoRA", "VeRA", "column_norm", "count_matrix_params", "vera_projections"]
