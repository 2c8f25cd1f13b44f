"""Research instruments: how fine-tuning moved each weight matrix.

All functions read Flax ``(in, out)`` kernels (``y = x @ W``): *output unit* ``n`` is column ``n``,
``W_n = W[:, n]``. Multi-axis and ``nn.scan``-stacked kernels are seen through a
:class:`~lowrank_jax.Layout` as ``(*stack, in, out)`` matrices and give one value per layer.

**Magnitude and direction** (DoRA, Liu et al. 2024, §2.2), over the ``N`` output units::

    ΔM = (1/N) Σ_n | ‖W_n‖ − ‖W0_n‖ |
    ΔD = (1/N) Σ_n (1 − cos(W_n, W0_n))

``1 − cos`` is evaluated as ``½‖W_n/‖W_n‖ − W0_n/‖W0_n‖‖²`` (equal in exact arithmetic, and free of
the cancellation of ``1 − cos`` when the update is small).

**Update spectrum**: the singular values of ``ΔW = s·A@B`` from the factors alone — reduced QR
``A = Q_A R_A``, ``Bᵀ = Q_B R_B``, so ``ΔW = Q_A (s·R_A R_Bᵀ) Q_Bᵀ`` and the singular values of ``ΔW``
are those of the ``r × r`` core ``s·R_A R_Bᵀ``. Cost ``O((in + out)·r²)``; no ``(in, out)`` array.

**Intruder dimensions** (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of
equivalence"): with ``y_j`` the top-``k`` singular vectors of the tuned ``W`` and ``x_i`` *all*
singular vectors of ``W0`` (on the same side)::

    y_j is an intruder  ⟺  max_i |cos(y_j, x_i)| < ε

counted over ``j = 1..k``. ``side="out"`` (default) uses the output-space singular vectors — the
paper's ``U`` of the torch ``(out, in)`` weight.

What is and is not computed factored (``W = W0 + s·A@B``):

* ``W0``'s singular vectors need one full SVD of ``W0`` — the definition compares against *all* of
  them, and ``W0`` has no structure to exploit. It does not depend on the adapter: compute it once
  (``w0_vectors=``) and reuse it across checkpoints and runs.
* ``W``'s top-``k`` singular triplets: ``solver="krylov"`` uses randomized block Krylov iteration
  (Musco & Musco 2015) with products ``W X = W0 X + s·A (B X)`` and ``Wᵀ Y = W0ᵀ Y + s·Bᵀ(Aᵀ Y)``
  and a Rayleigh–Ritz step — ``W`` is never formed. It is iterative: each result carries the residual
  ``‖W v_j − σ_j u_j‖ / σ_1`` (``Wᵀ u_j = σ_j v_j`` holds exactly by construction), a certificate that
  ``σ_j`` is within that distance of a true singular value. ``solver="svd"`` forms ``W`` and takes its
  full SVD (exact to rounding); ``"auto"`` (default) picks ``"svd"`` when ``min(in, out) <= 1024``.
* Tree-level functions run LoRA and VeRA nodes factored and merge one kernel at a time with
  :func:`lowrank_jax.merge` where a dense ``W`` is needed (DoRA, PiSSA, NF4 bases); full fine-tuning
  results are dense by nature.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.layout import Layout, resolve_layout
from lowrank_jax.paths import key_name, key_value, path_str

Array = jax.Array

__all__ = [
    "IntruderDimensions",
    "MagnitudeDirection",
    "intruder_dimensions",
    "intruder_dimensions_adapter",
    "magnitude_direction",
    "magnitude_direction_adapter",
    "magnitude_direction_tree",
    "update_spectra",
    "update_spectrum",
]


# ------------------------------------------------------------------------------------ helpers

def _up(x: Any) -> Array:
    """``x`` as a jax array in at least float32 (float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _as_matrix(w: Any, layout: Layout | None, what: str) -> Array:
    """``(*stack, in, out)`` float matrix of a kernel (2-D kernels need no layout)."""
    w = _up(w)
    if layout is not None:
        layout.check(w.shape, what)
        return layout.to_matrix(w)
    if w.ndim != 2:
        raise ValueError(
            f"{what}: got shape {tuple(w.shape)}; a kernel that is not a 2-D (in, out) matrix needs "
            f"layout=lowrank_jax.Layout(in_axes=..., out_axes=..., stack=...)"
        )
    return w


def _nodes(adapter: Any) -> list[tuple[tuple, str, AdapterParams]]:
    """``[(key_path, path, node)]`` of every adapter node."""
    flat, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=lambda x: isinstance(x, AdapterParams))
    out = []
    for keys, node in flat:
        if not isinstance(node, AdapterParams):
            raise TypeError(f"adapter: leaf at {path_str(keys)!r} is a {type(node).__name__}, "
                            "not an AdapterParams node")
        out.append((tuple(keys), path_str(keys), node))
    return out


def _get(tree: Any, keys: Sequence[Any], what: str, path: str) -> Any:
    node = tree
    for k in keys:
        try:
            node = node[key_value(k)]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{what} has no entry at {path!r} (missing {key_name(k)!r})") from None
    return node


def _nest(keys: Sequence[Any], value: Any) -> dict:
    out: Any = value
    for k in reversed(keys):
        out = {key_value(k): out}
    return out


def _shared_of(frozen: Any) -> Mapping:
    from lowrank_jax import SHARED_KEY
    return frozen.get(SHARED_KEY, {}) if isinstance(frozen, Mapping) else {}


def _f32_node(node: AdapterParams) -> AdapterParams:
    """``node`` reporting float32, so :func:`lowrank_jax.merge` does not round ``W'`` to a bf16 kernel dtype."""
    return AdapterParams(node.params, node.method, node.layout, node.shape, "float32", node.shared)


def _merged_matrix(frozen: Any, keys: tuple, path: str, node: AdapterParams) -> Array:
    """``W'`` of one adapted kernel, float32 ``(*stack, in, out)``: :func:`lowrank_jax.merge` of that kernel alone."""
    from lowrank_jax import SHARED_KEY, merge
    mini = _nest(keys, _get(frozen, keys, "frozen", path))
    shared = _shared_of(frozen)
    if shared:
        mini = {**mini, SHARED_KEY: shared}
    merged = merge(mini, _nest(keys, _f32_node(node)))
    return node.layout.to_matrix(_up(_get(merged, keys, "merged", path)))


def _base_matrix(frozen: Any, keys: tuple, path: str, node: AdapterParams) -> Array:
    """Frozen ``W0`` of one adapted kernel as float32 ``(*stack, in, out)`` (NF4 dequantized by ``merge``)."""
    leaf = _get(frozen, keys, "frozen", path)
    if isinstance(leaf, (jax.Array, np.ndarray)) and tuple(leaf.shape) == node.shape:
        return node.layout.to_matrix(_up(leaf))
    # Any other frozen representation (NF4): merge a zero LoRA, W0 + 1·A@0 = W0 exactly.
    from lowrank_jax import LoRA, merge
    stack = node.layout.stack_shape(node.shape)
    n_in, n_out = node.layout.matrix_shape(node.shape)
    zero = AdapterParams({"a": jnp.zeros(stack + (n_in, 1)), "b": jnp.zeros(stack + (1, n_out))},
                         LoRA(rank=1, alpha=1.0, targets=".*"), node.layout, node.shape, "float32")
    return node.layout.to_matrix(_up(_get(merge(_nest(keys, leaf), _nest(keys, zero)), keys, "merged", path)))


def _check_pissa(node: AdapterParams, path: str, params0: Any) -> None:
    if params0 is None and getattr(node.method, "init", None) == "pissa":
        raise ValueError(
            f"{path}: PiSSA keeps W0 − s·A@B in the frozen tree, so the frozen kernel is not the pretrained "
            "W0; pass params0= (the original params) to compare against the pretrained weights"
        )


def _reference(frozen: Any, keys: tuple, path: str, node: AdapterParams, params0: Any) -> Array:
    """Pretrained ``W0`` of one adapted kernel, ``(*stack, in, out)``: from ``params0`` or the frozen tree."""
    _check_pissa(node, path, params0)
    if params0 is None:
        return _base_matrix(frozen, keys, path, node)
    leaf = _get(params0, keys, "params0", path)
    if tuple(np.shape(leaf)) != node.shape:
        raise ValueError(f"{path}: params0 kernel has shape {tuple(np.shape(leaf))}, "
                         f"the adapter was made for {node.shape}")
    return node.layout.to_matrix(_up(leaf))


def _select(params: Any, targets: str | Sequence[str]) -> list[tuple[tuple, str, Any]]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be a regex or a non-empty list of regexes/paths, got {targets!r}")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    hits = [(tuple(k), path_str(k), v) for k, v in flat if any(re.fullmatch(t, path_str(k)) for t in targets)]
    if not hits:
        shown = ", ".join(path_str(k) for k, _ in flat[:12])
        raise ValueError(f"targets {list(targets)} match no path of params0; paths include: {shown}")
    return hits


# ------------------------------------------------------------------------ magnitude / direction

class MagnitudeDirection(NamedTuple):
    """DoRA's ``ΔM`` (mean absolute change of output-unit norms) and ``ΔD`` (mean ``1 − cos``).

    Scalars for one matrix; arrays of the stack shape for a stacked kernel (one value per layer).
    """

    delta_m: Array
    delta_d: Array


def _unit(w: Array, norm: Array) -> Array:
    return w / jnp.where(norm > 0, norm, 1.0)[..., None, :]


@jax.jit
def _md(w0: Array, w: Array) -> MagnitudeDirection:
    n0 = jnp.sqrt(jnp.sum(w0 * w0, axis=-2))
    n1 = jnp.sqrt(jnp.sum(w * w, axis=-2))
    delta_m = jnp.mean(jnp.abs(n1 - n0), axis=-1)
    one_minus_cos = 0.5 * jnp.sum(jnp.square(_unit(w, n1) - _unit(w0, n0)), axis=-2)
    # A zero column has no direction: 1 − cos := 0 if both columns are zero, 1 if only one is.
    one_minus_cos = jnp.where((n0 > 0) & (n1 > 0), one_minus_cos, jnp.where((n0 > 0) | (n1 > 0), 1.0, 0.0))
    return MagnitudeDirection(delta_m, jnp.mean(one_minus_cos, axis=-1))


def magnitude_direction(w0: Any, w: Any, *, layout: Layout | None = None) -> MagnitudeDirection:
    """DoRA's magnitude and direction change between a pretrained ``W0`` and a tuned ``W``.

    Over the ``N`` output units (columns of the ``(in, out)`` matrix)::

        ΔM = (1/N) Σ_n | ‖W_n‖ − ‖W0_n‖ |
        ΔD = (1/N) Σ_n (1 − cos(W_n, W0_n)),   1 − cos = ½‖W_n/‖W_n‖ − W0_n/‖W0_n‖‖²

    (a zero column has no direction: ``1 − cos`` counts as 0 if both columns are zero, 1 if one is).

    Args:
      w0, w: kernels of equal shape; 2-D ``(in, out)``, or any kernel with ``layout``.
      layout: a :class:`~lowrank_jax.Layout` for multi-axis / stacked kernels; the result then has
        the stack shape (one value per layer).

    Returns:
      ``MagnitudeDirection(delta_m, delta_d)`` in float32 (float64 inputs stay float64).

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.analysis import magnitude_direction
      >>> w0 = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0]])        # unit 0 doubles its norm, same direction
      >>> r = magnitude_direction(w0, w)
      >>> float(r.delta_m), float(r.delta_d)
      (0.5, 0.0)
    """
    a, b = _as_matrix(w0, layout, "w0"), _as_matrix(w, layout, "w")
    if a.shape != b.shape:
        raise ValueError(f"magnitude_direction: w0 has matrix shape {a.shape} but w has {b.shape}")
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return _md(a.astype(dtype), b.astype(dtype))


def magnitude_direction_tree(params0: Any, params: Any, targets: str | Sequence[str], *,
                             layouts: Mapping[str, Layout] | None = None) -> dict[str, MagnitudeDirection]:
    """:func:`magnitude_direction` of every kernel whose path matches ``targets`` — full fine-tuning results.

    Args:
      params0: pretrained params; params: tuned params (same structure at the selected paths).
      targets: a regex or list of regexes ``re.fullmatch``ed against ``/``-joined paths (a plain path
        matches itself).
      layouts: ``{path or regex: Layout}`` for kernels that are not 2-D (e.g. ``lowrank_jax.discover``).

    Returns:
      ``{path: MagnitudeDirection}`` (per-layer arrays for stacked kernels).
    """
    out = {}
    for keys, path, w0 in _select(params0, targets):
        w = _get(params, keys, "params", path)
        if tuple(np.shape(w)) != tuple(np.shape(w0)):
            raise ValueError(f"{path}: params0 has shape {tuple(np.shape(w0))} but params has {tuple(np.shape(w))}")
        out[path] = magnitude_direction(w0, w, layout=resolve_layout(path, tuple(np.shape(w0)), layouts))
    return out


def magnitude_direction_adapter(frozen: Any, adapter: Any, *, params0: Any = None) -> dict[str, MagnitudeDirection]:
    """:func:`magnitude_direction` of every adapted kernel: ``W0`` vs ``lowrank_jax.merge(frozen, adapter)``.

    Works for LoRA, DoRA, VeRA and NF4 bases; kernels are merged one at a time (float32, so a bf16
    kernel is not rounded). ``W0`` is the frozen kernel (dequantized if NF4) unless ``params0`` (the
    original params) is given — required for PiSSA, whose frozen tree holds ``W0 − s·A@B``.

    Returns:
      ``{path: MagnitudeDirection}`` (per-layer arrays for stacked kernels).
    """
    out = {}
    for keys, path, node in _nodes(adapter):
        w0 = _reference(frozen, keys, path, node, params0)
        out[path] = _md(w0, _merged_matrix(frozen, keys, path, node))
    return out


# -------------------------------------------------------------------------------- spectrum

def _low_rank_factors(update: Any, frozen: Any, what: str, dora: bool = True) -> tuple[Array, Array]:
    """``(L, R)`` with ``ΔW = L @ R`` (scale folded into ``L``), leading stack axes kept.

    ``dora=False`` refuses DoRA nodes, whose tuned weight is not ``W0 + s·A@B``.
    """
    if isinstance(update, AdapterParams):
        p = update.params
        if "m" in p and not dora:
            raise TypeError(f"{what}: DoRA's tuned weight m ⊙ V'/‖V'‖_col is not W0 + s·A@B; pass the merged "
                            "kernel as w (intruder_dimensions_adapter does this)")
        if "lambda_d" in p and "lambda_b" in p:         # VeRA: exact LoRA factors (s = 1)
            if frozen is None:
                raise ValueError(f"{what}: a VeRA node needs frozen= (it holds the shared projections)")
            from lowrank_jax.arithmetic import as_lora
            update = as_lora({"k": update}, frozen)["k"]
            p = update.params
        if "a" in p and "b" in p and hasattr(update.method, "scaling"):
            return update.method.scaling * _up(p["a"]), _up(p["b"])
        raise TypeError(f"{what}: no low-rank factors in a {type(update.method).__name__} node with arrays {list(p)}")
    if isinstance(update, (tuple, list)) and len(update) in (2, 3):
        a, b = _up(update[0]), _up(update[1])
        s = 1.0 if len(update) == 2 else update[2]
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
            raise ValueError(f"{what}: factors must be A (..., in, r) and B (..., r, out), got {a.shape} and {b.shape}")
        return s * a, b
    raise TypeError(f"{what}: expected an AdapterParams node or a tuple (A, B[, scale]), got {type(update).__name__}")


@jax.jit
def _spectrum(left: Array, right: Array) -> Array:
    from lowrank_jax.arithmetic import factored_svd    # QR of both factors, SVD of the r × r core
    return factored_svd(left, right, 1.0)[1]


def update_spectrum(update: Any, *, frozen: Any = None) -> Array:
    """Singular values of ``ΔW = s·A@B`` from the factors, without an ``(in, out)`` array.

    Reduced QR ``A = Q_A R_A`` and ``Bᵀ = Q_B R_B`` give ``ΔW = Q_A (s·R_A R_Bᵀ) Q_Bᵀ`` with orthonormal
    ``Q_A``, ``Q_B``, so ``σ(ΔW) = σ(s·R_A R_Bᵀ)``: an SVD of an ``r × r`` core (``min(in, r) ×
    min(out, r)`` when ``r`` exceeds a side). Cost ``O((in + out)·r²)``.

    Args:
      update: an :class:`~lowrank_jax.AdapterParams` node — LoRA (``s·A@B``), DoRA (its directional
        low-rank part ``s·A@B``; DoRA's full ``ΔW`` also rescales columns by ``m/‖V'‖`` and is not
        low-rank), VeRA (``(Aᵀ⊙λ_d)@(Bᵀ⊙λ_b)``, needs ``frozen``) — or a tuple ``(A, B)`` /
        ``(A, B, s)``. Leading stack axes give one spectrum per layer.
      frozen: the frozen tree (VeRA's shared projections).

    Returns:
      ``(*stack, min(in, out, r))`` singular values, descending.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.analysis import update_spectrum
      >>> a = jnp.array([[3.0], [0.0], [4.0]])            # ΔW = 2·a@b has one singular value 2·5·1
      >>> b = jnp.array([[0.0, 1.0]])
      >>> update_spectrum((a, b, 2.0)).tolist()
      [10.0]
    """
    left, right = _low_rank_factors(update, frozen, "update_spectrum")
    return _spectrum(left, right)


def update_spectra(adapter: Any, *, frozen: Any = None) -> dict[str, Array]:
    """``{path: update_spectrum(node)}`` for every LoRA/DoRA/VeRA node of ``adapter`` (VeRA needs ``frozen``)."""
    return {path: update_spectrum(node, frozen=frozen) for _, path, node in _nodes(adapter)}


# ----------------------------------------------------------------------- intruder dimensions

class IntruderDimensions(NamedTuple):
    """Intruder-dimension analysis of one tuned matrix (leading stack axes for stacked kernels).

    Attributes:
      count: number of intruders among the top-``k`` singular vectors of ``W``.
      is_intruder: ``(k,)`` bool, ``max_cos < epsilon``.
      max_cos: ``(k,)`` ``max_i |cos(y_j, x_i)|`` of each top singular vector ``y_j`` of ``W`` against
        all singular vectors ``x_i`` of ``W0``.
      singular_values: ``(k,)`` top-``k`` singular values of ``W``, descending.
      residual: ``(k,)`` ``‖W v_j − σ_j u_j‖ / σ_1`` of the computed triplets (rounding level for
        ``solver="svd"``; the convergence certificate for ``"krylov"``).
    """

    count: Array
    is_intruder: Array
    max_cos: Array
    singular_values: Array
    residual: Array


_SIDES = ("out", "in")


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side must be 'out' (output-space singular vectors, the paper's U of the torch "
                         f"(out, in) weight) or 'in', got {side!r}")


@functools.partial(jax.jit, static_argnames=("side",))
def _base_vectors(w0: Array, side: str) -> Array:
    """All singular vectors of ``W0`` on ``side`` as columns: ``(out, min)`` or ``(in, min)``."""
    u, _, vh = jnp.linalg.svd(w0, full_matrices=False)
    return jnp.swapaxes(vh, -1, -2) if side == "out" else u


def _orth(x: Array) -> Array:
    return jnp.linalg.qr(x)[0]


@functools.partial(jax.jit, static_argnames=("k", "block", "depth"))
def _krylov_topk(w0: Array, left: Array, right: Array, key: Array, *, k: int, block: int, depth: int):
    """Top-``k`` singular triplets of ``W = W0 + left@right`` by randomized block Krylov + Rayleigh–Ritz."""
    def mv(x):                                       # W x, x: (out, b)
        return w0 @ x + left @ (right @ x)

    def rmv(y):                                      # Wᵀ y, y: (in, b)
        return w0.T @ y + right.T @ (left.T @ y)

    q = _orth(mv(jax.random.normal(key, (w0.shape[1], block), w0.dtype)))
    basis = jnp.zeros((w0.shape[0], (depth + 1) * block), w0.dtype).at[:, :block].set(q)

    def extend(i, carry):                            # next block (W Wᵀ) q, orthogonal to the basis so far
        basis, q = carry
        z = mv(rmv(q))
        for _ in range(2):                           # block Gram–Schmidt, twice ("twice is enough");
            z = z - basis @ (basis.T @ z)            # not-yet-filled columns are zero and drop out
        q = _orth(z)
        return jax.lax.dynamic_update_slice(basis, q, (0, (i + 1) * block)), q

    basis, _ = jax.lax.fori_loop(0, depth, extend, (basis, q))
    qf = _orth(basis)                                # orthonormal even if the Krylov space saturated
    uc, s, vh = jnp.linalg.svd(rmv(qf).T, full_matrices=False)   # Rayleigh–Ritz on Qᵀ W (d, out)
    u, s, v = qf @ uc[:, :k], s[:k], vh[:k].T
    residual = jnp.linalg.norm(mv(v) - u * s, axis=0) / s[0]
    return u, s, v, residual


@functools.partial(jax.jit, static_argnames=("k",))
def _svd_topk(w: Array, *, k: int):
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    u, s, v = u[:, :k], s[:k], vh[:k].T
    residual = jnp.linalg.norm(w @ v - u * s, axis=0) / s[0]
    return u, s, v, residual


def _map_stack(fn, n_stack: int, *args):
    """Apply ``fn`` to each layer of the ``n_stack`` leading axes (a Python loop: one layer in memory)."""
    if n_stack == 0:
        return fn(*args)
    shape = args[0].shape[:n_stack]
    flat = [a.reshape(-1, *a.shape[n_stack:]) if a is not None else None for a in args]
    outs = [fn(*[f[i] if f is not None else None for f in flat]) for i in range(math.prod(shape))]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs).reshape(*shape, *xs[0].shape), *outs)


def intruder_dimensions(w0: Any, w: Any = None, *, update: Any = None, k: int = 10, epsilon: float = 0.5,
                        side: str = "out", solver: str = "auto", w0_vectors: Any = None,
                        layout: Layout | None = None, frozen: Any = None, oversample: int = 10,
                        depth: int = 12, seed: int = 0) -> IntruderDimensions:
    """Intruder dimensions of a tuned matrix ``W`` relative to the pretrained ``W0``.

    With ``y_j`` (``j = 1..k``) the top-``k`` singular vectors of ``W`` and ``x_i`` all
    ``min(in, out)`` singular vectors of ``W0``, on the same side::

        max_cos_j = max_i |⟨y_j, x_i⟩|,    y_j is an intruder  ⟺  max_cos_j < ε

    Give the tuned matrix either densely (``w``, e.g. full fine-tuning) or as a low-rank update of
    ``W0`` (``update``: ``W = W0 + ΔW``, never formed with ``solver="krylov"``).

    Args:
      w0: pretrained kernel, 2-D ``(in, out)`` or any kernel with ``layout``.
      w: tuned kernel (same shape), or ``None`` with ``update``.
      update: ``(A, B)`` / ``(A, B, s)`` for ``ΔW = s·A@B``, or an ``AdapterParams`` node (LoRA; VeRA with
        ``frozen``; DoRA is not a low-rank update of ``W0``: merge it and pass ``w``).
      k: number of top singular vectors of ``W`` examined (the paper uses 10).
      epsilon: cosine threshold ``ε`` (the paper sweeps it; 0.5 here by default).
      side: ``"out"`` — output-space singular vectors (the paper's ``U`` of the torch ``(out, in)``
        weight) — or ``"in"``.
      solver: ``"svd"`` (form ``W``, full SVD: exact), ``"krylov"`` (randomized block Krylov with
        ``W0`` and factor products, block ``k + oversample``, ``depth`` block iterations, seeded by
        ``seed``; see ``residual``), or ``"auto"``: ``"svd"`` when ``min(in, out) <= 1024``, else
        ``"krylov"`` for a factored update. A dense ``w`` always uses ``"svd"``-style products.
      w0_vectors: ``W0``'s singular vectors on ``side`` as columns (``(out, min)`` for ``"out"``), to
        reuse one SVD of ``W0`` across calls; default: computed here (one full SVD of ``W0``).
      layout: :class:`~lowrank_jax.Layout` for multi-axis / stacked kernels (per-layer results).

    Returns:
      :class:`IntruderDimensions` (``count``, ``is_intruder``, ``max_cos``, ``singular_values``,
      ``residual``), with leading stack axes for stacked kernels.

    Example — a rank-1 update along a direction W0 barely uses becomes the top singular vector:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.analysis import intruder_dimensions
      >>> w0 = jnp.diag(jnp.arange(16.0, 0.0, -1.0))                      # singular vectors e_0..e_15
      >>> v = jnp.zeros(16).at[12:].set(0.5)                             # spread over e_12..e_15
      >>> r = intruder_dimensions(w0, update=(v[:, None], 40.0 * v[None, :]), k=3, epsilon=0.6)
      >>> int(r.count), [round(float(c), 2) for c in r.max_cos]
      (1, [0.52, 1.0, 1.0])
    """
    _check_side(side)
    if solver not in ("auto", "svd", "krylov"):
        raise ValueError(f"solver must be 'auto', 'svd' or 'krylov', got {solver!r}")
    if (w is None) == (update is None):
        raise ValueError("intruder_dimensions: give exactly one of w (the tuned kernel) or update (its low-rank ΔW)")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    base = _as_matrix(w0, layout, "w0")
    n_stack = base.ndim - 2
    n_in, n_out = base.shape[-2:]
    if k > min(n_in, n_out):
        raise ValueError(f"k={k} exceeds min(in, out) = {min(n_in, n_out)} of the ({n_in}, {n_out}) matrix")
    if w0_vectors is None:
        x = _base_vectors(base, side)
    else:
        x = _up(w0_vectors)
        dim = n_out if side == "out" else n_in
        if x.shape[:n_stack] != base.shape[:n_stack] or x.ndim != n_stack + 2 or x.shape[-2] != dim:
            raise ValueError(f"w0_vectors has shape {x.shape}; for side={side!r} expected "
                             f"{base.shape[:n_stack] + (dim, min(n_in, n_out))} (vectors as columns)")
    if w is not None:
        tuned = _as_matrix(w, layout, "w")
        if tuned.shape != base.shape:
            raise ValueError(f"intruder_dimensions: w0 has matrix shape {base.shape} but w has {tuned.shape}")
        left = right = None
    else:
        left, right = _low_rank_factors(update, frozen, "intruder_dimensions", dora=False)
        if left.shape[:-1] != base.shape[:-1] or right.shape[:-2] + right.shape[-1:] != base.shape[:-2] + (n_out,):
            raise ValueError(f"intruder_dimensions: update factors {left.shape} @ {right.shape} do not fit the "
                             f"{base.shape} matrix of w0")
        if solver == "svd" or (solver == "auto" and min(n_in, n_out) <= 1024):
            tuned = base + left @ right
            left = right = None
        else:
            tuned = None
    block = min(k + oversample, min(n_in, n_out))
    depth = max(0, min(depth, -(-min(n_in, n_out) // block) - 1))   # no more blocks than span the space
    key = jax.random.key(seed)

    def one(w0m, wm, lm, rm, xm):
        if wm is not None:
            u, s, v, res = _svd_topk(wm.astype(xm.dtype), k=k)
        else:
            u, s, v, res = _krylov_topk(w0m, lm, rm, key, k=k, block=block, depth=depth)
        y = v if side == "out" else u
        max_cos = jnp.max(jnp.abs(xm.T @ y), axis=0)
        hit = max_cos < epsilon
        return IntruderDimensions(jnp.sum(hit), hit, max_cos, s, res)

    return _map_stack(one, n_stack, base, tuned, left, right, x)


def intruder_dimensions_adapter(frozen: Any, adapter: Any, *, params0: Any = None, k: int = 10,
                                epsilon: float = 0.5, side: str = "out", solver: str = "auto",
                                **kwargs: Any) -> dict[str, IntruderDimensions]:
    """:func:`intruder_dimensions` of every adapted kernel, one kernel at a time.

    LoRA and VeRA nodes over a plain-array frozen kernel are passed factored (``W = W0 + ΔW`` from
    the factors); DoRA, PiSSA and NF4-base kernels are merged with :func:`lowrank_jax.merge` (one
    kernel, float32) and analysed densely. ``W0`` is the frozen kernel (dequantized if NF4) or, if
    given, the kernel in ``params0`` (required for PiSSA). ``kwargs`` go to :func:`intruder_dimensions`
    (``oversample``, ``depth``, ``seed``).
    """
    out = {}
    for keys, path, node in _nodes(adapter):
        w0 = _reference(frozen, keys, path, node, params0)          # (*stack, in, out)
        opts = dict(k=k, epsilon=epsilon, side=side, solver=solver, layout=Layout(stack=w0.ndim - 2), **kwargs)
        p = node.params
        factored = ("m" not in p and getattr(node.method, "init", None) != "pissa"
                    and isinstance(_get(frozen, keys, "frozen", path), (jax.Array, np.ndarray)))
        if factored:
            out[path] = intruder_dimensions(w0, update=node, frozen=frozen, **opts)
        else:
            out[path] = intruder_dimensions(w0, _merged_matrix(frozen, keys, path, node), **opts)
    return out
