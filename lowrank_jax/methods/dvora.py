"""DVoRA: DoRA's magnitude over VeRA's direction update (Liu et al. 2024, §5 "DoRA on VeRA").

The direction is updated as in :class:`~lowrank_jax.VeRA` — the shared frozen projections
``A_sh (r, max_in)``, ``B_sh (max_out, r)`` sliced per layer, trainable ``λ_d (r,)`` and ``λ_b (out,)`` —
and the magnitude as in :class:`~lowrank_jax.DoRA`, a trainable ``m (out,)`` initialised to ``‖W0‖_col``::

    ΔW = (Aᵀ ⊙ λ_d) @ (Bᵀ ⊙ λ_b)                 (in, out), no alpha scaling (VeRA)
    W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_col

At init ``λ_b = 0`` so ``ΔW = 0`` and ``W' = W0``. Factored, with ``Ã = Aᵀ ⊙ λ_d`` and ``B̃ = Bᵀ ⊙ λ_b``
it is DoRA with ``s = 1``: ``y = k ⊙ (x@W0 + ((x@Aᵀ) ⊙ λ_d)@Bᵀ ⊙ λ_b)``,
``‖V'_j‖² = ‖W0_j‖² + 2⟨(ÃᵀW0)_j, B̃_j⟩ + B̃_jᵀ(ÃᵀÃ)B̃_j``. PEFT has no DVoRA; adapters are saved in
lowrank_jax's own files.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.methods.base import OUT, ArraySpec, FrozenInputs, check_bool
from lowrank_jax.methods.lora import (at_least_f32, check_output_name, column_norm, column_sq_norm, factored_sq_norm,
                                      rescaled_output, scale_from_sq_norm)
from lowrank_jax.methods.vera import VeRA

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DVoRA(VeRA):
    """Weight-decomposed VeRA: trains ``lambda_d (r,)``, ``lambda_b (out,)`` and the magnitude ``m (out,)``.

    Args are those of :class:`~lowrank_jax.VeRA` (``rank=256``, ``targets``, ``d_initial=0.1``,
    ``seed=0`` — the same seed gives the same shared projections as ``VeRA``, ``dropout``), plus
    ``detach_norm`` (default ``True``, as DoRA): treat ``‖W0 + ΔW‖_col`` as a constant in the backward,
    and ``output_name`` (default ``None``; as :class:`~lowrank_jax.DoRA`'s, for remat policies that save only
    layer outputs).

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lj
      >>> params = {"q": {"kernel": jnp.ones((16, 8))}}
      >>> frozen, adapter = lj.init(lj.DVoRA(rank=4, targets="q/kernel"), params, jax.random.key(0))
      >>> sorted(adapter["q"]["kernel"])
      ['lambda_b', 'lambda_d', 'm']
    """

    detach_norm: bool = True
    output_name: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_bool(self.detach_norm, "detach_norm", "DVoRA")
        check_output_name(self.output_name, "DVoRA")

    arrays = MappingProxyType({**VeRA.arrays, "m": ArraySpec((OUT,))})

    def _factors(self, n_in: int, n_out: int, params: dict[str, Array], shared: dict[str, Array]):
        """``(Ã, B̃) = (Aᵀ ⊙ λ_d, Bᵀ ⊙ λ_b)``, float32, ``(in, r)`` and ``(r, out)``."""
        a, b = self._slices(shared, n_in, n_out)
        return (at_least_f32(a) * at_least_f32(params["lambda_d"])[None, :], at_least_f32(b) * at_least_f32(params["lambda_b"])[None, :])

    def _scale(self, sq: Array, params: dict[str, Array]) -> Array:
        """``k = m / ‖V'‖_col`` from ``sq = ‖V'‖²_col`` (a constant of the backward with ``detach_norm``)."""
        if self.detach_norm:
            sq = jax.lax.stop_gradient(sq)
        return scale_from_sq_norm(at_least_f32(params["m"]), sq)

    @property
    def reads_base_at_init(self) -> bool:
        """``m = ‖W0‖_col`` and the cache ``‖W0_j‖²`` read ``W0``."""
        return True

    def init_matrix(self, key: Array, w: Array, shared: Any = None) -> tuple[dict[str, Array], None]:
        params, _ = super().init_matrix(key, w, shared)
        return {**params, "m": column_norm(w)}, None

    def frozen_cache(self, w: Array) -> Array:
        """``‖W0_j‖²`` (float32, ``(out,)``), as DoRA."""
        return column_sq_norm(w)

    def merge_matrix(self, w: Array, params: dict[str, Array], shared: dict[str, Array]) -> Array:
        """``W' = m ⊙ V' / ‖V'‖_col`` with ``V' = W0 + (Aᵀ ⊙ λ_d) @ (Bᵀ ⊙ λ_b)`` (float32)."""
        v = super().merge_matrix(w, params, shared)
        return v * self._scale(column_sq_norm(v), params)[None, :]

    def forward(self, x: Array, y: Array, bias: Array | None, params: dict[str, Array],
                frozen: FrozenInputs) -> Array:
        """``k ⊙ (y − bias + ((x@Aᵀ) ⊙ λ_d)@Bᵀ ⊙ λ_b) + bias``, ``k = m / ‖W0 + ΔW‖_col`` (factored)."""
        w = frozen.kernel()
        a, b = self._factors(w.shape[0], w.shape[1], params, frozen.shared)
        if self.detach_norm:   # a constant of the backward: autodiff traces no JVP through the norm
            a, b = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
        scale = self._scale(factored_sq_norm(w, a, b, 1.0, frozen.cache), params)
        return rescaled_output(y, bias, self.branch(x, params, frozen.shared), scale, self.output_name)
