"""Weight quantization (NF4, bitsandbytes-compatible)."""

from lowrank_jax.quant.nf4 import (
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    NF4Array,
    dequantize,
    from_bnb_state_dict,
    load_bnb_safetensors,
    nf4_matmul,
    quantize,
    save_bnb_safetensors,
    to_bnb_state_dict,
)

__all__ = [
    "DYNAMIC_MAP_SIGNED",
    "NF4_CODE",
    "NF4Array",
    "dequantize",
    "from_bnb_state_dict",
    "load_bnb_safetensors",
    "nf4_matmul",
    "quantize",
    "save_bnb_safetensors",
    "to_bnb_state_dict",
]
