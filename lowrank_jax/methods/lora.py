"""LoRA and DoRA on one ``(in, out)`` weight matrix (Flax layout, ``y = x @ W``).

LoRA (Hu et al. 2021; PEFT ``LoraLayer``)::

    W' = W0 + s · A @ B,   A ∈ R^{in×r},  B ∈ R^{r×out},  s = alpha / r   (rsLoRA: alpha / sqrt(r))

PEFT stores the transposes: ``lora_A.weight = Aᵀ (r, in)``, ``lora_B.weight = Bᵀ (out, r)``.

DoRA (Liu et al. 2024; PEFT ``use_dora=True``) splits magnitude and direction::

    V' = W0 + s · A @ B
    W' = m ⊙ V' / ‖V'‖_col,      ‖V'‖_col[j] = sqrt(Σ_i V'[i, j]²),   m ∈ R^{out} (init ‖W0‖_col)

With ``detach_norm=True`` (the paper's §4.3 and PEFT's default) ``‖V'‖_col`` is treated as a constant in
the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lowrank_jax.methods.base import (
    IN,
    OUT,
    RANK,
    ArraySpec,
    FrozenInputs,
    MethodBase,
    check_alpha,
    check_bool,
    check_dropout,
    check_rank,
    normalize_targets,
)

Array = jax.Array

DEFAULT_TARGETS = r"(.*/)?kernel"
# checkpoint_name of DoRA's pre-scale output x@W0 + s·(x@A)@B: its magnitude gradient needs it, so a
# remat policy that saves only layer outputs should also save this name, e.g.
# jax.checkpoint_policies.save_only_these_names("my_layer_out", lowrank_jax.DORA_PRE_SCALE).
DORA_PRE_SCALE = "lowrank_dora_pre_scale"

_FACTORS = {"a": ArraySpec((IN, RANK), "lora_A.weight"), "b": ArraySpec((RANK, OUT), "lora_B.weight")}


def at_least_f32(x: Array) -> Array:
    """``x`` in at least float32 (float64 stays float64, for reference checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
_INITS = ("kaiming_uniform", "gaussian", "pissa")


def _validate_low_rank(m: Any, name: str) -> None:
    check_rank(m.rank, name)
    object.__setattr__(m, "alpha", check_alpha(m.alpha, name))
    object.__setattr__(m, "dropout", check_dropout(m.dropout, name))
    object.__setattr__(m, "targets", normalize_targets(m.targets, f"{name}.targets"))
    check_bool(m.rslora, "rslora", name)
    if m.init not in _INITS:
        raise ValueError(f"{name}: init must be one of {_INITS}, got {m.init!r}")
    if m.quant is not None:
        from lowrank_jax.quant.config import NF4
        if not isinstance(m.quant, NF4):
            raise TypeError(f"{name}: quant must be lowrank_jax.NF4(...) or None, got {m.quant!r}")


class _LowRank(MethodBase):
    """Shared math of LoRA and DoRA: the factors ``A (in, r)``, ``B (r, out)`` and their scaling."""

    rank: int
    alpha: float
    rslora: bool
    init: str

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def check_shape(self, path: str, n_in: int, n_out: int) -> None:
        if self.rank > min(n_in, n_out):
            raise ValueError(
                f"{path}: rank {self.rank} exceeds min(in, out) = {min(n_in, n_out)} of its "
                f"(in, out) = ({n_in}, {n_out}) matrix; use rank <= {min(n_in, n_out)}"
            )

    def _init_factors(self, key: Array, w: Array) -> tuple[Array, Array, Array | None]:
        """``(A, B, W0_new)``: random A and zero B, or PiSSA's top-r SVD factors and residual base."""
        n_in, n_out = w.shape
        r = self.rank
        if self.init == "pissa":
            # W = U diag(S) Vh; A = U_r diag(sqrt(S_r / s)), B = diag(sqrt(S_r / s)) Vh_r; W0 ← W − s·A@B.
            u, sv, vh = jnp.linalg.svd(w, full_matrices=False)
            root = jnp.sqrt(sv[:r] / self.scaling)
            a = u[:, :r] * root[None, :]
            b = root[:, None] * vh[:r]
            return a, b, w - self.scaling * (a @ b)
        if self.init == "gaussian":
            a = jax.random.normal(key, (n_in, r), jnp.float32) / r
        else:  # kaiming_uniform with a=sqrt(5) on torch's (r, in) weight: bound = 1/sqrt(in)
            bound = 1.0 / n_in ** 0.5
            a = jax.random.uniform(key, (n_in, r), jnp.float32, -bound, bound)
        # B = 0 from host memory: placed without an XLA program (eager jnp.zeros compiles one per shape)
        return a, jax.device_put(np.zeros((r, n_out), np.float32)), None

    def delta_matrix(self, params: dict[str, Array]) -> Array:
        """``ΔW = s · A @ B`` in float32."""
        return self.scaling * (at_least_f32(params["a"]) @ at_least_f32(params["b"]))

    def branch(self, x: Array, params: dict[str, Array], shared: Any = None) -> Array:
        """Factored adapter output ``s · (x @ A) @ B`` (the scale applied to the thin ``x @ A``)."""
        a = params["a"].astype(x.dtype)
        b = params["b"].astype(x.dtype)
        return ((x @ a) * jnp.asarray(self.scaling, x.dtype)) @ b

    def forward(self, x: Array, y: Array, bias: Array | None, params: dict[str, Array],
                frozen: FrozenInputs) -> Array:
        """``y + s·(x@A)@B``: the base output plus the branch, cast to ``y``'s dtype."""
        return y + self.branch(x, params).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LoRA(_LowRank):
    """Low-rank adaptation: ``W' = W0 + s·A@B`` with ``A: (in, r)``, ``B: (r, out)``.

    Args:
      rank: ``r``, between 1 and ``min(in, out)`` of every targeted matrix.
      alpha: scaling numerator; ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``). PEFT's default
        ``lora_alpha=8`` with ``r=8`` gives ``s = 1``.
      targets: regex or list of regexes ``re.fullmatch``ed against ``/``-joined param paths
        (default: every leaf named ``kernel``).
      dropout: probability of dropping an element of the adapter *input* (the base path never sees
        dropout), used by :func:`lowrank_jax.apply` when given a dropout key.
      rslora: use ``s = alpha / sqrt(r)``.
      init: ``"kaiming_uniform"`` (PEFT default: ``A ~ U(±1/sqrt(in))``, ``B = 0``), ``"gaussian"``
        (``A ~ N(0, 1/r²)``, ``B = 0``) or ``"pissa"`` (``A, B`` from the top-r SVD of ``W0``, and the
        frozen ``W0`` replaced by ``W0 − s·A@B``, so the model is unchanged at init).
      quant: ``lowrank_jax.NF4(...)`` stores the frozen targeted kernels as NF4 (QLoRA): shorthand
        for ``init(method, quantize(params, NF4(targets=method.targets)))``; to quantize the whole
        base and adapt a few kernels, call :func:`lowrank_jax.quantize` yourself.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lj
      >>> params = {"attn": {n: {"kernel": jnp.ones((32, 32))} for n in ("query", "key", "value")}}
      >>> method = LoRA(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
      >>> frozen, adapter = lj.init(method, params, jax.random.key(0))
      >>> sorted(adapter["attn"]), lj.count_params(adapter)
      (['query', 'value'], 1024)
    """

    rank: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming_uniform"
    quant: Any = None

    def __post_init__(self):
        _validate_low_rank(self, "LoRA")

    arrays = MappingProxyType(_FACTORS)

    @property
    def reads_base_at_init(self) -> bool:
        """Only PiSSA reads ``W0`` (its SVD); random ``A`` and zero ``B`` need the shape alone."""
        return self.init == "pissa"

    def init_matrix(self, key: Array, w: Array, shared: Any = None) -> tuple[dict[str, Array], Array | None]:
        a, b, w_new = self._init_factors(key, w)
        return {"a": a, "b": b}, w_new

    def merge_matrix(self, w: Array, params: dict[str, Array], shared: Any = None) -> Array:
        """``W' = W0 + s · A @ B`` (float32)."""
        return w + self.delta_matrix(params)


@dataclasses.dataclass(frozen=True)
class DoRA(_LowRank):
    """Weight-decomposed low-rank adaptation: ``W' = m ⊙ (W0 + s·A@B) / ‖W0 + s·A@B‖_col``.

    Trainable: ``a: (in, r)``, ``b: (r, out)`` as in :class:`LoRA`, and the magnitude ``m: (out,)``
    initialised to the column norms of ``W0 + s·A@B`` (= ``‖W0‖_col`` since ``B = 0``), i.e. the norm
    over the input axis for each output unit — PEFT's ``lora_magnitude_vector``.

    Args are those of :class:`LoRA`, plus ``detach_norm`` (default ``True``, as in the paper and PEFT):
    treat ``‖W0 + s·A@B‖_col`` as a constant in the backward pass, and ``output_name`` (default ``None``):
    for ``jax.checkpoint``/``nn.remat`` policies that save only layer outputs. The magnitude's gradient
    ``∂L/∂m_j ∝ Σ_t dy_tj · P_tj`` needs the pre-scale output ``P = x@W0 + s·(x@A)@B``, which such a
    policy does not keep, so by default the backward recomputes ``x@W0``. With ``output_name="lin_out"``
    the layer's scaled output ``O = k ⊙ P`` (before the bias) is named ``"lin_out"`` and the backward
    reads ``P = O / k`` from it (:func:`rescaled_output`): a policy saving ``"lin_out"`` then keeps
    nothing more than for LoRA and recomputes no base matmul. Name the adapted layers' outputs this way
    *instead of* with your own ``checkpoint_name`` on them (both would save the tensor twice). A column
    with ``m_j = 0`` exactly (``k_j = 0``) loses ``P_j``; its ``m_j`` gradient is then NaN, never a
    silent wrong value (``make_train_step(nan_guard=True)`` skips such a step). Adapters stacked with
    :func:`lowrank_jax.stack` run the default path (same values; ``output_name`` only changes what a remat
    policy can save).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    rslora: bool = False
    detach_norm: bool = True
    init: str = "kaiming_uniform"
    quant: Any = None
    output_name: str | None = None

    def __post_init__(self):
        _validate_low_rank(self, "DoRA")
        check_bool(self.detach_norm, "detach_norm", "DoRA")
        check_output_name(self.output_name, "DoRA")

    arrays = MappingProxyType({**_FACTORS, "m": ArraySpec((OUT,), "lora_magnitude_vector")})

    def frozen_cache(self, w: Array) -> Array:
        """``‖W0_j‖²`` (float32, ``(out,)``): ``W0`` is frozen, so the factored norm reads it once per
        step (for ``AᵀW0``) instead of twice."""
        return column_sq_norm(w)

    def init_matrix(self, key: Array, w: Array, shared: Any = None) -> tuple[dict[str, Array], Array | None]:
        a, b, w_new = self._init_factors(key, w)
        # V' = W0 + s·A@B is W0 itself while B = 0 (every init but PiSSA's): no (in, out) product and sum
        v = w if w_new is None else w_new + self.scaling * (a @ b)
        return {"a": a, "b": b, "m": column_norm(v)}, w_new

    def merge_matrix(self, w: Array, params: dict[str, Array], shared: Any = None) -> Array:
        """``W' = (m / ‖V'‖_col) ⊙ V'`` with ``V' = W0 + s·A@B`` (float32; see :func:`scale_from_sq_norm`)."""
        v = w + self.delta_matrix(params)
        return v * self._scale(column_sq_norm(v), params)[None, :]

    def _scale(self, sq: Array, params: dict[str, Array]) -> Array:
        """``k = m / ‖V'‖_col`` from ``sq = ‖V'‖²_col`` (a constant of the backward with ``detach_norm``)."""
        if self.detach_norm:
            sq = jax.lax.stop_gradient(sq)
        return scale_from_sq_norm(at_least_f32(params["m"]), sq)

    def output_scale(self, w: Array, params: dict[str, Array], cache: Array | None = None) -> Array:
        """``m / ‖W0 + s·A@B‖_col`` computed without an ``(in, out)`` temporary (:func:`factored_sq_norm`);
        ``‖W0_j‖²`` may be supplied precomputed as ``cache``."""
        a, b = at_least_f32(params["a"]), at_least_f32(params["b"])
        if self.detach_norm:   # a constant of the backward: autodiff traces no JVP through the norm
            a, b = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
        return self._scale(factored_sq_norm(w, a, b, self.scaling, cache), params)

    def forward(self, x: Array, y: Array, bias: Array | None, params: dict[str, Array],
                frozen: FrozenInputs) -> Array:
        """``k ⊙ (y − bias + s·(x@A)@B) + bias`` with ``k = m / ‖W0 + s·A@B‖_col`` (no ``(in, out)``
        temporary; :func:`rescaled_output`)."""
        scale = self.output_scale(frozen.kernel(), params, frozen.cache)
        return rescaled_output(y, bias, self.branch(x, params), scale, self.output_name)


def check_output_name(name: Any, method: str) -> None:
    """``output_name`` is ``None`` or a non-empty string (a ``checkpoint_name``)."""
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"{method}: output_name must be None or a non-empty str (a jax checkpoint_name), "
                        f"got {name!r}")


def rescaled_output(y: Array, bias: Array | None, branch: Array, scale: Array,
                    output_name: str | None = None) -> Array:
    """``k ⊙ (y − bias + branch) + bias`` in the branch's dtype, cast back to ``y``'s: the factored
    output of a magnitude/direction method (DoRA, DVoRA) given its base output ``y = x@W0 + bias``,
    its additive branch and ``k = m / ‖W0 + ΔW‖_col``.

    The magnitude's gradient needs the pre-scale sum ``P = y − bias + branch``. Without
    ``output_name`` it is named :data:`DORA_PRE_SCALE` for remat policies. With ``output_name`` the
    scaled output ``O = k ⊙ P`` is named ``output_name`` and is the only tensor the backward keeps:
    ``∂L/∂P = dy ⊙ k`` and ``∂L/∂k_j = Σ_t dy_tj · O_tj / k_j`` (= ``Σ_t dy_tj · P_tj``; NaN where
    ``k_j = 0``, since ``O_j = 0`` has lost ``P_j``).
    """
    adt = branch.dtype
    y_nobias = y - bias.astype(y.dtype) if bias is not None else y
    pre = y_nobias.astype(adt) + branch
    if output_name is None:
        out = checkpoint_name(pre, DORA_PRE_SCALE) * scale.astype(adt)[None, :]
    else:
        out = _scale_columns(pre, scale.astype(adt), output_name)
    if bias is not None:
        out = out + bias.astype(adt)
    return out.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scale_columns(pre: Array, scale: Array, name: str) -> Array:
    """``pre ⊙ scale`` over columns, whose backward reads only its own (named) output."""
    return pre * scale[None, :]


def _scale_columns_fwd(pre: Array, scale: Array, name: str) -> tuple[Array, tuple[Array, Array]]:
    out = checkpoint_name(pre * scale[None, :], name)
    return out, (out, scale)


def _scale_columns_bwd(name: str, res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    out, scale = res
    s32 = at_least_f32(scale)
    d_scale = jnp.sum(at_least_f32(dy) * at_least_f32(out), axis=0) / s32       # Σ_t dy·O / k = Σ_t dy·P
    return dy * scale[None, :], d_scale.astype(scale.dtype)


_scale_columns.defvjp(_scale_columns_fwd, _scale_columns_bwd)


def factored_sq_norm(w: Array, a: Array, b: Array, s: float, w_sq: Array | None = None) -> Array:
    """``‖W0 + s·A@B‖²_col`` without forming the ``(in, out)`` sum (float32, ``(out,)``)::

        ‖V'_j‖² = ‖W0_j‖² + 2s·⟨(AᵀW0)_j, B_j⟩ + s²·B_jᵀ (AᵀA) B_j

    one ``(r, out)`` and one ``(r, r)`` product; ``w_sq = ‖W0_j‖²`` may be given precomputed.
    Clamped at 0 against rounding.
    """
    w = at_least_f32(w)
    w_sq = jnp.sum(w * w, axis=0) if w_sq is None else w_sq
    cross = jnp.sum((a.T @ w) * b, axis=0)                # ⟨(AᵀW0)_{:,j}, B_{:,j}⟩
    quad = jnp.sum(b * ((a.T @ a) @ b), axis=0)           # B_jᵀ (AᵀA) B_j
    return jnp.maximum(w_sq + 2.0 * s * cross + s * s * quad, 0.0)


def scale_from_sq_norm(m: Array, sq: Array) -> Array:
    """DoRA's scale ``k_j = m_j / ‖V'_j‖`` from ``sq_j = ‖V'_j‖²``: ``m_j / sqrt(sq_j)`` where ``sq_j > 0``,
    and ``1`` where ``sq_j = 0``.

    A zero column of ``V' = W0 + ΔW`` has no direction, so ``W'_j = V'_j = 0`` whatever the scale; choosing 1
    there keeps merge-at-init the identity for dead (all-zero) output units and gives the column plain LoRA
    gradients until it has a norm — finite values instead of ``0/0``. One compare: XLA copies this ``(out,)``
    chain into every fusion that reads ``k``, so a short chain is a smaller program (DoRA's bench step: 8284 →
    7608 HLO instructions against a sqrt-then-divide with two compares, compile −8 %).
    """
    positive = sq > 0
    # the select between sqrt and divide keeps XLA from rewriting m / sqrt(s) into m * rsqrt(s) (other rounding)
    n = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 1.0)
    return jnp.where(positive, m / n, 1.0)


def column_sq_norm(w: Array) -> Array:
    """``‖W‖²_col[j] = Σ_i W[i, j]²`` (float32) — one value per output unit of an ``(in, out)`` matrix."""
    return jnp.sum(jnp.square(at_least_f32(w)), axis=0)


def column_norm(w: Array) -> Array:
    """``‖W‖_col[j] = sqrt(Σ_i W[i, j]²)`` — one value per output unit of an ``(in, out)`` matrix."""
    return safe_sqrt(column_sq_norm(w))


def safe_sqrt(sq: Array) -> Array:
    """``sqrt(sq)`` with a zero (not infinite) derivative at ``sq = 0``, so a zero column's norm never
    puts ``0 · ∞ = NaN`` into a gradient."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
