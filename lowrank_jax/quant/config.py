"""``NF4``: the configuration value that turns LoRA/DoRA into QLoRA/QDoRA."""

from __future__ import annotations

import dataclasses

from lowrank_jax.methods.base import normalize_targets

_COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class NF4:
    """Store the frozen base of the adapted kernels as 4-bit NormalFloat (bitsandbytes-exact).

    ``LoRA(..., quant=NF4())`` is QLoRA and ``DoRA(..., quant=NF4())`` is QDoRA: each kernel the method
    targets (or only those of them matching ``targets``) is replaced in the frozen tree by an
    :class:`~lowrank_jax.quant.nf4.NF4Array` of its transposed matrix view — the torch ``(out, in)``
    layout, so the bytes equal what ``bitsandbytes`` stores for the same torch weight.

    Args:
      block_size: elements per absmax block (bitsandbytes default 64); a positive even number.
      double_quant: also quantize the per-block absmax to 8 bits in blocks of 256 (≈4.13 bits/weight
        instead of 4.5), as bitsandbytes' ``compress_statistics=True``.
      targets: regex or list of regexes (``re.fullmatch`` on the ``/``-joined path) selecting which of
        the method's targets are quantized; ``None`` quantizes all of them.
      compute_dtype: dtype the kernel is dequantized to inside the layer (``"bfloat16"``,
        ``"float32"``, …); ``None`` uses the original kernel dtype.
    """

    block_size: int = 64
    double_quant: bool = True
    targets: str | tuple[str, ...] | None = None
    compute_dtype: str | None = None

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"NF4 block_size must be a positive even integer, got {self.block_size!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", normalize_targets(self.targets, "NF4.targets"))
        if self.compute_dtype is not None:
            import numpy as np
            import jax.numpy as jnp
            name = str(np.dtype(jnp.dtype(self.compute_dtype)))
            if name not in _COMPUTE_DTYPES:
                raise ValueError(f"NF4 compute_dtype must be one of {_COMPUTE_DTYPES[1:]}, got {self.compute_dtype!r}")
            object.__setattr__(self, "compute_dtype", name)
