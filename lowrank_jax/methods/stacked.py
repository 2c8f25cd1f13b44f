"""``Stacked``: K adapters of one kernel side by side, each example of a batch choosing its own.

A stacked node (made by :func:`lowrank_jax.stack`) is an ordinary :class:`~lowrank_jax.AdapterParams`
whose method is ``Stacked(methods=(m_0, …, m_{K-1}), rank=R)`` and whose arrays carry a leading
adapter axis ``K`` (after the kernel's layer-stack axes): ``a (K, in, R)``, ``b (K, R, out)``,
``m (K, out)`` for LoRA/DoRA, ``lambda_d (K, r)``, ``lambda_b (K, out)`` (``m``) for VeRA/DVoRA.

* ``m_k`` is adapter ``k``'s own method (its scale ``s_k``, ``detach_norm``, …), kept statically, so
  the factored output and the gradients of slot ``k`` are those of adapter ``k`` run alone;
  ``m_k = None`` where adapter ``k`` does not target this kernel (its slot holds zeros and its scale
  is 0: it contributes nothing, exactly).
* LoRA/DoRA ranks ``r_k`` are zero-padded to ``R``: ``A[:, r_k:] = 0``, ``B[r_k:] = 0`` leave
  ``A@B`` unchanged and receive exactly zero gradient.
* LoRA and DoRA (VeRA and DVoRA) may share a kernel: slots without a magnitude get scale 1.
* VeRA slots share the frozen projections of the one frozen tree (same rank and seed).

:meth:`Stacked.forward` is given ``ids (B,)`` — example ``b`` of the batch uses adapter ``ids[b]``,
``-1`` (any id outside ``[0, K)``) the bare base — and the matrix view's rows grouped per example
(``rows = B · n``). It is grouped, not a loop over adapters: each example's factors are gathered
(``A[ids] (B, in, R)``) and the branch is two batched thin products, so a batch mixing K adapters
costs what a batch with one costs; DoRA's K column-norm scales ``(K, out)`` are computed once per
call (vmapped :func:`~lowrank_jax.methods.lora.factored_sq_norm`) and gathered per example; VeRA's
shared projection product ``x @ Aᵀ`` is one matmul for all examples and only the λ's are gathered.
The per-adapter math (scales, norms, magnitudes, VeRA slices, the rescaled output) is the method
modules'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.methods.base import RANK, ArraySpec, FrozenInputs, MethodBase
from lowrank_jax.methods.dvora import DVoRA
from lowrank_jax.methods.lora import (DoRA, LoRA, at_least_f32, factored_sq_norm, rescaled_output,
                                      scale_from_sq_norm)
from lowrank_jax.methods.vera import VeRA

Array = jax.Array

__all__ = ["Stacked", "family_of", "is_stacked"]

# family -> (methods without a magnitude, methods with one)
_FAMILIES = {"lora": (LoRA, DoRA), "vera": (VeRA, DVoRA)}


def family_of(method: Any) -> str | None:
    """``"lora"`` (LoRA, DoRA), ``"vera"`` (VeRA, DVoRA) or ``None`` (a method that cannot be stacked)."""
    for name, classes in _FAMILIES.items():
        if type(method) in classes:
            return name
    return None


def is_stacked(method: Any) -> bool:
    return isinstance(method, Stacked)


def _has_magnitude(method: Any) -> bool:
    return type(method) in (DoRA, DVoRA)


@dataclasses.dataclass(frozen=True)
class Stacked(MethodBase):
    """K adapters of one kernel (see the module docstring). Made by :func:`lowrank_jax.stack`.

    Args:
      methods: adapter ``k``'s method at this kernel, or ``None`` where it does not target it.
      rank: the padded rank ``R`` (LoRA/DoRA) or the shared VeRA rank.
    """

    methods: tuple[Any, ...]
    rank: int

    def __post_init__(self):
        methods = tuple(self.methods)
        object.__setattr__(self, "methods", methods)
        present = [m for m in methods if m is not None]
        if not present:
            raise ValueError("Stacked: no adapter targets this kernel")
        families = {family_of(m) for m in present}
        if None in families or len(families) != 1:
            raise TypeError(f"Stacked: methods must all be LoRA/DoRA or all VeRA/DVoRA, got "
                            f"{sorted({type(m).__name__ for m in present})}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < max(m.rank for m in present):
            raise ValueError(f"Stacked: rank must be an int >= every adapter's rank, got {self.rank!r}")
        if self.family == "vera" and {(m.rank, m.seed) for m in present} != {(self.rank, present[0].seed)}:
            raise ValueError("Stacked: VeRA adapters share the frozen projections: they need the same rank and seed")

    # ------------------------------------------------------------------ declaration
    @property
    def k(self) -> int:
        return len(self.methods)

    @property
    def family(self) -> str:
        return family_of(next(m for m in self.methods if m is not None))

    @property
    def magnitude(self) -> bool:
        return any(_has_magnitude(m) for m in self.methods if m is not None)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for m in self.methods if m is not None for t in m.targets))

    @property
    def dropout(self) -> float:
        """The largest adapter-input dropout rate (each example uses its own adapter's)."""
        return max(m.dropout for m in self.methods if m is not None)

    quant = None

    @property
    def arrays(self) -> Mapping[str, ArraySpec]:
        """Adapter ``k``'s array roles with the adapter axis in front. It is declared with the ``"rank"``
        role — never sharded, like the rank — so sharding specs and LoRA+ groups follow the per-adapter
        declaration (shapes come from :meth:`param_shapes`)."""
        base = _FAMILIES[self.family][1].arrays if self.magnitude else _FAMILIES[self.family][0].arrays
        return MappingProxyType({k: ArraySpec((RANK,) + s.axes, s.peft) for k, s in base.items()})

    @property
    def shared_arrays(self) -> Mapping[str, ArraySpec]:
        return VeRA.shared_arrays if self.family == "vera" else MappingProxyType({})

    def slot_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        """One slot's array shapes (rank ``R``), without the adapter axis."""
        return {k: ArraySpec(s.axes[1:]).shape(n_in, n_out, self.rank) for k, s in self.arrays.items()}

    def param_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        return {k: (self.k,) + v for k, v in self.slot_shapes(n_in, n_out).items()}

    # ------------------------------------------------------------------ refused
    def init_matrix(self, key: Array, w: Array, shared: Any = None):
        raise TypeError("Stacked adapters are made by lowrank_jax.stack([...]) from initialised adapters")

    def merge_matrix(self, w: Array, params: dict[str, Array], shared: Any = None) -> Array:
        raise TypeError(
            "lowrank_jax: a stacked adapter (lowrank_jax.stack) holds one adapter per example and cannot be "
            "merged into one kernel; merge one of lowrank_jax.unstack(stacked), or run it factored with "
            "lowrank_jax.apply(..., adapter_ids=ids) (every stacked kernel must be consumed by a recognised "
            "layer: nn.Dense/DenseGeneral/Einsum, nnx.Linear/LinearGeneral/Einsum or custom_layers)")

    # ------------------------------------------------------------------ per-example selection
    def _slots(self, ids: Array) -> tuple[Array, Array]:
        """``(slot, idx)``: the gather index in ``[0, K)`` and the index into ``K + 1`` per-adapter
        constants whose last entry is the bare base (ids outside ``[0, K)``)."""
        ids = ids.astype(jnp.int32)
        idx = jnp.where((ids >= 0) & (ids < self.k), ids, self.k)
        return jnp.minimum(idx, self.k - 1), idx

    def _per_slot(self, values: list[float], base: float, idx: Array, dtype: Any) -> Array:
        return jnp.asarray(values + [base], dtype)[idx]

    def input_dropout(self, x: Array, key_data: Array | None, ids: Array) -> Array:
        """Inverted dropout of the adapter input with each example's own rate (the base path never
        sees it); the same mask as the unstacked path's for equal rates."""
        if key_data is None or self.dropout == 0.0:
            return x
        _, idx = self._slots(ids)
        rate = self._per_slot([m.dropout if m is not None else 0.0 for m in self.methods], 0.0, idx, x.dtype)
        rate = jnp.repeat(rate, x.shape[0] // ids.shape[0])[:, None]
        keep = jax.random.bernoulli(jax.random.wrap_key_data(key_data), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Array, y: Array, bias: Array | None, params: dict[str, Array],
                frozen: FrozenInputs, ids: Array | None = None) -> Array:
        """Rows ``x (B·n, in)``, base output ``y (B·n, out)``; example ``b`` (rows ``b·n … b·n+n−1``)
        gets adapter ``ids[b]``'s factored output, an id outside ``[0, K)`` the base output ``y``."""
        if ids is None:
            raise ValueError("Stacked.forward needs the per-example adapter ids (lowrank_jax.apply(..., "
                             "adapter_ids=ids))")
        n_b = ids.shape[0]
        n = x.shape[0] // n_b
        slot, idx = self._slots(ids)
        present = [m is not None for m in self.methods]
        if self.family == "lora":
            branch = self._lora_branch(x.reshape(n_b, n, -1), params, slot, idx)
        else:
            branch = self._vera_branch(x, n_b, n, params, frozen.shared, slot, idx, present)
        y3 = y.reshape(n_b, n, -1)
        if not self.magnitude:
            return (y3 + branch.astype(y.dtype)).reshape(y.shape)
        scale = self._magnitude_scales(frozen, params)                       # (K, out)
        scale = jnp.concatenate([scale, jnp.ones_like(scale[:1])])[idx]     # (B, out); base: 1
        out = jax.vmap(rescaled_output, in_axes=(0, None, 0, 0))(y3, bias, branch, scale)
        base_row = (idx == self.k)[:, None, None]
        return jnp.where(base_row, y3, out).reshape(y.shape)

    def _scalings(self) -> list[float]:
        return [m.scaling if m is not None else 0.0 for m in self.methods]

    def _lora_branch(self, x3: Array, params: dict[str, Array], slot: Array, idx: Array) -> Array:
        """``s_k · (x_b @ A_k) @ B_k`` per example (LoRA's branch with gathered factors)."""
        dt = x3.dtype
        a = jnp.take(params["a"].astype(dt), slot, axis=0)                   # (B, in, R)
        b = jnp.take(params["b"].astype(dt), slot, axis=0)                   # (B, R, out)
        s = self._per_slot(self._scalings(), 0.0, idx, dt)                   # (B,); base, untargeted: 0
        h = jnp.einsum("bni,bir->bnr", x3, a) * s[:, None, None]
        return jnp.einsum("bnr,bro->bno", h, b)

    def _vera_branch(self, x: Array, n_b: int, n: int, params: dict[str, Array], shared: Mapping[str, Array],
                     slot: Array, idx: Array, present: list[bool]) -> Array:
        """``(((x_b @ Aᵀ) ⊙ λ_d,k) @ Bᵀ) ⊙ λ_b,k`` per example (VeRA's branch; one shared ``x @ Aᵀ``)."""
        dt = x.dtype
        n_out = params["lambda_b"].shape[-1]
        a, b = VeRA._slices(shared, x.shape[-1], n_out)
        on = self._per_slot([1.0 if p else 0.0 for p in present], 0.0, idx, dt)
        ld = jnp.take(params["lambda_d"].astype(dt), slot, axis=0)          # (B, r)
        lb = jnp.take(params["lambda_b"].astype(dt), slot, axis=0) * on[:, None]
        h = (x @ a.astype(dt)).reshape(n_b, n, -1) * ld[:, None, :]
        return (h @ b.astype(dt)) * lb[:, None, :]

    def _magnitude_scales(self, frozen: FrozenInputs, params: dict[str, Array]) -> Array:
        """``m_k / ‖W0 + ΔW_k‖_col`` for every slot ``(K, out)``; 1 for slots without a magnitude."""
        w = frozen.kernel()
        n_in, n_out = w.shape
        if self.family == "lora":
            a, b = at_least_f32(params["a"]), at_least_f32(params["b"])
            s = jnp.asarray(self._scalings(), jnp.float32)
        else:
            ref = next(m for m in self.methods if m is not None)
            a, b = jax.vmap(lambda p: DVoRA._factors(ref, n_in, n_out, p, frozen.shared))(
                {"lambda_d": params["lambda_d"], "lambda_b": params["lambda_b"]})
            s = jnp.ones((self.k,), jnp.float32)
        sq = jax.vmap(factored_sq_norm, in_axes=(None, 0, 0, 0, None))(w, a, b, s, frozen.cache)
        detach = jnp.asarray([getattr(m, "detach_norm", False) for m in self.methods])[:, None]
        sq = jnp.where(detach, jax.lax.stop_gradient(sq), sq)
        scale = scale_from_sq_norm(at_least_f32(params["m"]), sq)
        on = jnp.asarray([_has_magnitude(m) for m in self.methods])[:, None]
        return jnp.where(on, scale, jnp.ones_like(scale))


def rows_per_example(path: str, view: Any, n_ids: int) -> int:
    """Rows of the matrix view per example: the leading input axis must be the batch of ``n_ids``."""
    if not view.rows or view.x_perm[0] != 0 or view.rows[0] != n_ids:
        lead = "contracted" if view.x_perm and view.x_perm[0] != 0 else (view.rows[0] if view.rows else None)
        raise ValueError(
            f"lowrank_jax.apply: {path}: adapter_ids has {n_ids} entries but this layer's input has leading axis "
            f"{lead} (non-contracted axes {view.rows}); per-example adapters need the leading axis of every "
            "adapted layer's input to be the batch")
    return math.prod(view.rows[1:])
