"""lowrank_jax: low-rank adapters (LoRA, DoRA, VeRA, QLoRA/QDoRA) for JAX/Flax as pure pytree transforms.

    base = lowrank_jax.quantize(params, lowrank_jax.NF4())   # optional: a 4-bit frozen base (QLoRA)
    frozen, adapter = lowrank_jax.init(lowrank_jax.LoRA(rank=8, targets=r".*/(query|value)/kernel"), params, key)
    params_eff = lowrank_jax.merge(frozen, adapter)       # == params at init, bitwise
    y = lowrank_jax.apply(model, {"params": frozen}, adapter, x)   # factored: never forms W0 + ΔW
"""

from lowrank_jax import analysis, arithmetic, io, plan, sharding, sweep, train
from lowrank_jax.adapter import AdapterParams
from lowrank_jax.execution import DORA_PRE_SCALE, LayerSpec, apply, discover
from lowrank_jax.io import load_adapter, save_adapter
from lowrank_jax.layout import Layout
from lowrank_jax.methods import DoRA, DVoRA, LoRA, VeRA, vera_projections
from lowrank_jax.quant import nf4
from lowrank_jax.quant.config import NF4
from lowrank_jax.quant.kernels import quantize
from lowrank_jax.stacking import stack, unstack
from lowrank_jax.tree import SHARED_KEY, base_params, count_params, expected_count, init, merge

__version__ = "0.1.0"

__all__ = [
    "AdapterParams",
    "DORA_PRE_SCALE",
    "LayerSpec",
    "apply",
    "discover",
    "train",
    "analysis",
    "arithmetic",
    "sweep",
    "plan",
    "sharding",
    "io",
    "save_adapter",
    "load_adapter",
    "DoRA",
    "DVoRA",
    "Layout",
    "LoRA",
    "NF4",
    "SHARED_KEY",
    "VeRA",
    "base_params",
    "count_params",
    "expected_count",
    "init",
    "merge",
    "nf4",
    "quantize",
    "stack",
    "unstack",
    "vera_projections",
]
