"""VeRA on one ``(in, out)`` weight matrix: shared frozen random projections, two trainable vectors.

VeRA (Kopiczko et al. 2024; PEFT ``VeraModel``). One pair of frozen random matrices is shared by all
adapted layers, in PEFT's layout ``A_sh: (r, max_in)``, ``B_sh: (max_out, r)``, where ``max_in`` /
``max_out`` are the element-wise maxima over the targeted matrices. A layer with an ``(in, out)``
kernel uses the slices ``A = A_sh[:, :in]``, ``B = B_sh[:out, :]`` and trains ``λ_d ∈ R^r`` (init
``d_initial``) and ``λ_b ∈ R^out`` (init 0)::

    h = x @ W0 + (((x @ Aᵀ) ⊙ λ_d) @ Bᵀ) ⊙ λ_b
    W' = W0 + (Aᵀ diag(λ_d)) @ (Bᵀ diag(λ_b))           (no alpha scaling)

The projections are Kaiming-uniform with bound ``sqrt(6 / fan_in)`` (fan_in = max_in for A, r for B),
drawn exactly as ``torch.Generator().manual_seed(seed)`` draws them in PEFT, so the same ``seed``
gives bitwise the same projections: torch's CPU generator is MT19937 and ``uniform_`` on float32 uses
the low 24 bits of each 32-bit draw, ``u = (raw & 0xFFFFFF) / 2**24``, ``v = float32(u·(hi−lo) + lo)``.
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.methods.base import (
    IN,
    OUT,
    RANK,
    ArraySpec,
    FrozenInputs,
    MethodBase,
    check_dropout,
    check_rank,
    normalize_targets,
)
from lowrank_jax.methods.lora import DEFAULT_TARGETS

Array = jax.Array


def vera_projections(rank: int, max_in: int, max_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's shared VeRA projections ``(A (r, max_in), B (max_out, r))``, float32, bitwise.

    Numpy's ``RandomState`` is the same MT19937 stream as torch's CPU generator for a given seed.
    """
    n_a, n_b = rank * max_in, max_out * rank
    raw = np.random.RandomState(seed).randint(0, 2**32, size=n_a + n_b, dtype=np.uint64)
    u = (raw & 0xFFFFFF).astype(np.float64) / float(2**24)

    def uniform(u_part: np.ndarray, fan_in: int) -> np.ndarray:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
        lo, hi = np.float32(-bound), np.float32(bound)
        return (u_part * (np.float64(hi) - np.float64(lo)) + np.float64(lo)).astype(np.float32)

    a = uniform(u[:n_a], max_in).reshape(rank, max_in)
    b = uniform(u[n_a:], rank).reshape(max_out, rank)
    return a, b


@dataclasses.dataclass(frozen=True)
class VeRA(MethodBase):
    """Vector-based random matrix adaptation: trains ``lambda_d: (r,)`` and ``lambda_b: (out,)`` per layer.

    Args:
      rank: ``r`` of the shared projections (PEFT default 256; may exceed a layer's in/out).
      targets: regex or list of regexes ``re.fullmatch``ed against ``/``-joined param paths.
      d_initial: initial value of every ``λ_d`` entry (PEFT default 0.1); ``λ_b`` starts at 0 so
        ``ΔW = 0`` at init.
      seed: PRNG seed of the shared projections (PEFT's ``projection_prng_key``); they live in the
        frozen tree and are regenerable from it with :func:`vera_projections`.
      dropout: dropout probability on the adapter input (see :class:`~lowrank_jax.LoRA`).
    """

    rank: int = 256
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0

    def __post_init__(self):
        check_rank(self.rank, "VeRA")
        object.__setattr__(self, "dropout", check_dropout(self.dropout, "VeRA"))
        object.__setattr__(self, "targets", normalize_targets(self.targets, "VeRA.targets"))
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) \
                or not math.isfinite(self.d_initial):
            raise ValueError(f"VeRA: d_initial must be a finite number, got {self.d_initial!r}")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"VeRA: seed must be an integer in [0, 2**32), got {self.seed!r}")

    quant = None  # no shorthand; a quantized base comes from lowrank_jax.quantize

    arrays = MappingProxyType({"lambda_d": ArraySpec((RANK,), "vera_lambda_d"),
                               "lambda_b": ArraySpec((OUT,), "vera_lambda_b")})
    # PEFT's layout: A (r, max_in), B (max_out, r); stored as base_model.vera_A / vera_B
    shared_arrays = MappingProxyType({"a": ArraySpec((RANK, IN), "vera_A"), "b": ArraySpec((OUT, RANK), "vera_B")})

    def make_shared(self, max_in: int, max_out: int) -> dict[str, Array]:
        a, b = vera_projections(self.rank, max_in, max_out, self.seed)
        return {"a": jnp.asarray(a), "b": jnp.asarray(b)}

    @property
    def reads_base_at_init(self) -> bool:
        """``λ_d`` and ``λ_b`` are constants: ``W0``'s shape alone sizes them."""
        return False

    def init_matrix(self, key: Array, w: Array, shared: Any = None) -> tuple[dict[str, Array], None]:
        n_out = w.shape[1]
        return {
            "lambda_d": jnp.full((self.rank,), self.d_initial, jnp.float32),
            "lambda_b": jnp.zeros((n_out,), jnp.float32),
        }, None

    @staticmethod
    def _slices(shared: dict[str, Array], n_in: int, n_out: int) -> tuple[Array, Array]:
        """``Aᵀ = A_sh[:, :in]ᵀ (in, r)`` and ``Bᵀ = B_sh[:out]ᵀ (r, out)``."""
        return shared["a"][:, :n_in].T, shared["b"][:n_out, :].T

    def merge_matrix(self, w: Array, params: dict[str, Array], shared: dict[str, Array]) -> Array:
        """``W' = W0 + (Aᵀ ⊙ λ_d) @ (Bᵀ ⊙ λ_b)`` (float32)."""
        a, b = self._slices(shared, *w.shape)
        ld = params["lambda_d"].astype(jnp.float32)
        lb = params["lambda_b"].astype(jnp.float32)
        return w + (a.astype(jnp.float32) * ld[None, :]) @ (b.astype(jnp.float32) * lb[None, :])

    def branch(self, x: Array, params: dict[str, Array], shared: dict[str, Array]) -> Array:
        """Factored ``(((x @ Aᵀ) ⊙ λ_d) @ Bᵀ) ⊙ λ_b``."""
        n_out = params["lambda_b"].shape[-1]
        a, b = self._slices(shared, x.shape[-1], n_out)
        dt = x.dtype
        h = (x @ a.astype(dt)) * params["lambda_d"].astype(dt)
        return (h @ b.astype(dt)) * params["lambda_b"].astype(dt)

    def forward(self, x: Array, y: Array, bias: Array | None, params: dict[str, Array],
                frozen: FrozenInputs) -> Array:
        """``y + (((x @ Aᵀ) ⊙ λ_d) @ Bᵀ) ⊙ λ_b``, cast to ``y``'s dtype."""
        return y + self.branch(x, params, frozen.shared).astype(y.dtype)
