"""Adapter arithmetic: combine, truncate and remove adapters of one frozen base, with exact semantics.

Everything here is about the per-kernel update ``ΔW`` in the kernel's ``(in, out)`` matrix view (its
:class:`~lowrank_jax.Layout`; one matrix per ``nn.scan``-stacked layer, factors carry the stack axes)::

    LoRA  ΔW = s·A@B                        A (in, r), B (r, out), s = alpha/r (alpha/√r rsLoRA)
    VeRA  ΔW = (Aᵀ⊙λ_d)@(Bᵀ⊙λ_b)             shared frozen projections, see as_lora
    DoRA  ΔW = m⊙V'/‖V'‖_col − W0           V' = W0 + s·A@B  (not additive in A, B, m)

Low-rank and exact (nothing of size ``(in, out)`` is formed):

* :func:`weighted_sum` — ``Σ_k w_k ΔW_k`` by concatenating factors,
  ``A = [A_1 | A_2 | …]``, ``B = [w_1 s_1/s·B_1; w_2 s_2/s·B_2; …]``, so ``s·A@B = Σ_k w_k s_k A_k B_k``
  exactly. Combining ``A`` and ``B`` separately, ``(Σ w_k A_k)(Σ w_k B_k)``, adds the cross terms
  ``w_k w_l A_k B_l`` (k ≠ l) — the bug of PEFT's old ``add_weighted_adapter`` (PEFT issue #3013).
* :func:`truncate` — best rank-k approximation (Eckart–Young) through a *factored* SVD: QR of ``A`` and
  of ``Bᵀ``, SVD of the small core; reports the discarded spectrum (:class:`Spectrum`).
* :func:`as_lora` — VeRA adapters as exact LoRA factors (they then combine like LoRA).

Dense (``ΔW`` formed per kernel, float32, kernel-shaped; a *delta tree* mirrors the adapter paths):

* :func:`deltas`, :func:`linear` (task arithmetic), :func:`ties` (Yadav et al. 2023), :func:`dare`
  (Yu et al. 2023) — always on ``ΔW``, never on ``A`` and ``B`` separately;
* :func:`add_delta` (``W0 + ΔW``) and :func:`factorize` (full SVD back to a rank-k LoRA adapter, with
  the discarded spectrum).

And :func:`unmerge`, the inverse of :func:`lowrank_jax.merge` (exact for LoRA/VeRA; DoRA given the base
column norms).

Example (two rank-2 adapters → one rank-4 adapter with exactly the summed update):

    >>> import jax, jax.numpy as jnp, lowrank_jax as lj
    >>> from lowrank_jax import arithmetic
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
    >>> _, ad1 = lj.init(lj.LoRA(rank=2, alpha=4.0), params, jax.random.key(1))
    >>> _, ad2 = lj.init(lj.LoRA(rank=2, alpha=2.0), params, jax.random.key(2))
    >>> def trained(ad, v):                  # init has B = 0: give the adapter an update
    ...     node = ad["dense"]["kernel"]
    ...     return {"dense": {"kernel": node.replace(b=jnp.full_like(node.b, v))}}
    >>> ad1, ad2 = trained(ad1, 1.0), trained(ad2, -0.5)
    >>> both = arithmetic.weighted_sum([ad1, ad2], [0.5, 2.0])
    >>> both["dense"]["kernel"].method.rank
    4
    >>> d = lambda ad: lj.merge(params, ad)["dense"]["kernel"] - params["dense"]["kernel"]
    >>> bool(jnp.allclose(d(both), 0.5 * d(ad1) + 2.0 * d(ad2), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowrank_jax as lj  # attributes are read at call time (this module may be imported by __init__)

__all__ = [
    "Spectrum",
    "weighted_sum",
    "truncate",
    "as_lora",
    "deltas",
    "linear",
    "ties",
    "dare",
    "dare_key",
    "add_delta",
    "factorize",
    "unmerge",
]

Array = jax.Array
F32 = jnp.float32


# ------------------------------------------------------------------------------------- reports

@functools.partial(jax.tree_util.register_dataclass, data_fields=["kept", "discarded", "rel_error"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Spectrum:
    """What a rank-``k`` truncation of one kernel's ``ΔW`` kept and dropped (a pytree of three arrays).

    Attributes:
      kept: ``(*stack, k)`` singular values of ``ΔW`` that were kept, descending.
      discarded: ``(*stack, t − k)`` singular values dropped, descending, where ``t`` is the number of
        singular values computed (``min(r, in, out)`` for a factored SVD — the rest are exactly 0 —
        ``min(in, out)`` for a dense one).
      rel_error: ``(*stack,)`` relative Frobenius error of the truncation,
        ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ discarded² / Σ all²)`` (0 when ``ΔW = 0``).
    """

    kept: Array
    discarded: Array
    rel_error: Array

    @property
    def max_rel_error(self) -> float:
        """The largest ``rel_error`` over the stacked layers."""
        return float(jnp.max(self.rel_error)) if self.rel_error.size else 0.0

    def __repr__(self) -> str:
        return (f"Spectrum(kept={list(self.kept.shape)}, discarded={list(self.discarded.shape)}, "
                f"max_rel_error={self.max_rel_error:.3g})")


# ------------------------------------------------------------------------------------- helpers

def _key_of(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _path_of(key_path: Sequence[Any]) -> str:
    return "/".join(str(_key_of(k)) for k in key_path)


def _path_index(tree: Any) -> tuple[list[Any], Any, dict[str, int]]:
    """Leaves (NF4 kernels whole), treedef and ``{path: position}`` of ``base_params(tree)``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(lj.base_params(tree), is_leaf=_is_nf4)
    return [v for _, v in flat], treedef, {_path_of(kp): i for i, (kp, _) in enumerate(flat)}


def _is_node(x: Any) -> bool:
    return isinstance(x, lj.AdapterParams)


def _is_nf4(x: Any) -> bool:
    return isinstance(x, lj.nf4.NF4Array)


def _nodes(adapter: Any, what: str) -> list[tuple[str, tuple, Any]]:
    """``[(path, keys, node), ...]`` of every adapter node (``path`` is ``/``-joined ``keys``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_node)
    out = []
    for kp, v in flat:
        keys = tuple(_key_of(k) for k in kp)
        path = "/".join(str(k) for k in keys)
        if not _is_node(v):
            raise TypeError(f"{what}: the leaf at {path!r} is a {type(v).__name__}, not an AdapterParams node "
                            "(pass adapters as lowrank_jax.init / io.peft.load return them)")
        out.append((path, keys, v))
    if not out:
        raise ValueError(f"{what}: the adapter has no AdapterParams nodes")
    return out


def _nest(items: Sequence[tuple[tuple, Any]]) -> dict:
    tree: dict = {}
    for keys, value in items:
        cur = tree
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
    return tree


def _adapter_list(adapters: Any, what: str) -> list[Any]:
    if isinstance(adapters, (Mapping, lj.AdapterParams)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"{what}: expected a non-empty list of adapters (one nested dict of AdapterParams "
                        f"each), got {type(adapters).__name__}")
    return list(adapters)


def _collect(adapters: Sequence[Any], what: str) -> dict[str, tuple[tuple, list[tuple[int, Any]]]]:
    """``{path: (keys, [(k, node_k), ...])}`` over the union of targets, checking one frozen base."""
    table: dict[str, tuple[tuple, list[tuple[int, Any]]]] = {}
    for k, adapter in enumerate(adapters):
        for path, keys, node in _nodes(adapter, f"{what}: adapters[{k}]"):
            _, contrib = table.setdefault(path, (keys, []))
            if contrib:
                k0, n0 = contrib[0]
                for attr, noun in (("shape", "a kernel of shape"), ("layout", "the kernel layout"),
                                   ("dtype", "a kernel of dtype")):
                    if getattr(node, attr) != getattr(n0, attr):
                        raise ValueError(
                            f"{what}: {path}: adapters[{k0}] was made for {noun} {getattr(n0, attr)} but "
                            f"adapters[{k}] for {noun} {getattr(node, attr)}: the adapters do not share one "
                            "frozen base, so their updates cannot be combined")
            contrib.append((k, node))
    return table


def _weights(weights: Any, n: int, what: str) -> list[float]:
    try:
        ws = list(weights)
    except TypeError:
        raise TypeError(f"{what}: weights must be a sequence of {n} real numbers (one per adapter), "
                        f"got {weights!r}") from None
    if len(ws) != n:
        raise ValueError(f"{what}: got {len(ws)} weights for {n} adapters; pass exactly one weight per adapter")
    out = []
    for i, w in enumerate(ws):
        if isinstance(w, (bool, np.bool_)):
            raise TypeError(f"{what}: weights[{i}] = {w!r} is a bool, not a real number")
        try:
            f = float(w)
        except (TypeError, ValueError):
            raise TypeError(f"{what}: weights[{i}] = {w!r} is not a concrete real number") from None
        if not math.isfinite(f):
            raise ValueError(f"{what}: weights[{i}] = {f} is not finite; weights must be finite real numbers")
        out.append(f)
    return out


def _check_rank(rank: Any, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{what}: rank must be an integer >= 1, got {rank!r}")
    return int(rank)


def _kind(method: Any) -> str:
    """``"dora"``, ``"vera"``, ``"lora"`` or ``"other"`` (DoRA checked first: it shares LoRA's factors)."""
    if isinstance(method, lj.DoRA):
        return "dora"
    if isinstance(method, lj.VeRA):
        return "vera"
    if isinstance(method, lj.LoRA):
        return "lora"
    return "other"


def _require_lora(what: str, path: str, method: Any, who: str) -> None:
    kind = _kind(method)
    if kind == "lora":
        return
    name = type(method).__name__
    if kind == "vera":
        why = ("VeRA's ΔW = (Aᵀ⊙λ_d)@(Bᵀ⊙λ_b) reads the frozen shared projections, which the adapter does not "
               "hold; convert it first with lowrank_jax.arithmetic.as_lora(adapter, frozen) (exact)")
    elif kind == "dora":
        why = ("DoRA is not additive in its factors: W' = m⊙V'/‖V'‖_col renormalises every column, so no "
               "DoRA adapter on the same base has ΔW = Σ_k w_k ΔW_k in general; combine DoRA adapters densely "
               "with linear/ties/dare(..., frozen=frozen), which use each adapter's effective ΔW = W' − W0")
    else:
        why = "only LoRA factors can be combined or truncated in factored form"
    raise TypeError(f"{what}: {path}: {who} uses {name} ({method!r}); {why}")


def _common_meta(what: str, path: str, contrib: Sequence[tuple[int, Any]]) -> tuple[float, Any, str]:
    """``(dropout, quant, init)`` for a result node from the nodes it stands for."""
    dropouts = {float(getattr(n.method, "dropout", 0.0)) for _, n in contrib}
    quants = {getattr(n.method, "quant", None) for _, n in contrib}
    if len(quants) > 1:
        raise ValueError(f"{what}: {path}: the adapters quantize the frozen kernel differently "
                         f"({sorted(map(repr, quants))}): they do not share one frozen base")
    pissa = {(k, n.method.rank) for k, n in contrib if getattr(n.method, "init", None) == "pissa"}
    if pissa and (len(pissa) != len(contrib) or len({r for _, r in pissa}) > 1):
        inits = {k: (getattr(n.method, "init", None), getattr(n.method, "rank", None)) for k, n in contrib}
        raise ValueError(f"{what}: {path}: PiSSA adapters replace the frozen kernel by the residual of their "
                         f"top-r SVD, so only PiSSA adapters of one rank share a base; got (init, rank) per "
                         f"adapter {inits}")
    return (dropouts.pop() if len(dropouts) == 1 else 0.0), quants.pop(), ("pissa" if pissa else "kaiming_uniform")


def _result_alpha(alpha: float | None, rslora: bool, rank: int) -> float:
    """``alpha`` of a result method: by default the one giving ``s = 1``."""
    if alpha is None:
        return math.sqrt(rank) if rslora else float(rank)
    return alpha


def _lora_items(specs: Sequence[tuple[str, tuple, Any, int, tuple, dict]], alpha: float | None,
                rslora: bool) -> list[tuple[tuple, Any]]:
    """``[(keys, node)]`` from ``(path, keys, like_node, rank, (dropout, quant, init), arrays)``: one LoRA
    method per group of equal rank and settings, targeting the escaped paths of its kernels."""
    groups: dict[tuple, list[str]] = {}
    for path, _, _, r, meta, _ in specs:
        groups.setdefault((r,) + meta, []).append(path)
    methods = {}
    for (r, dropout, quant, init), paths in groups.items():
        method = lj.LoRA(rank=r, alpha=_result_alpha(alpha, rslora, r), rslora=rslora, dropout=dropout,
                         init=init, quant=quant, targets=tuple(re.escape(p) for p in sorted(paths)))
        methods.update({p: method for p in paths})
    return [(keys, lj.AdapterParams(arrays, methods[path], like.layout, like.shape, like.dtype))
            for path, keys, like, _, _, arrays in specs]


def _scale(alpha: float | None, rslora: bool, rank: int) -> float:
    """The scale ``s`` of the result LoRA of this rank (the method's own value; LoRA validates alpha)."""
    return lj.LoRA(rank=rank, alpha=_result_alpha(alpha, rslora, rank), rslora=rslora).scaling


def _split(left: Array, sv: Array, right: Array, k: int, s: Array) -> tuple[Array, ...]:
    """Balanced rank-k factors of ``left·diag(sv)·right`` for scale ``s``, and the spectrum pieces
    ``(A, B, kept, discarded, rel_error)``."""
    root = jnp.sqrt(sv[..., :k] / s)
    a = left[..., :k] * root[..., None, :]
    b = root[..., :, None] * right[..., :k, :]
    total = jnp.sum(jnp.square(sv), axis=-1)
    dropped = jnp.sum(jnp.square(sv[..., k:]), axis=-1)
    rel = jnp.where(total > 0, jnp.sqrt(dropped / jnp.where(total > 0, total, 1.0)), 0.0)
    return a, b, sv[..., :k], sv[..., k:], rel


def _with_report(pieces: tuple[Array, ...]) -> tuple[Array, Array, Spectrum]:
    a, b, kept, discarded, rel = pieces
    return a, b, Spectrum(kept=kept, discarded=discarded, rel_error=rel)


def factored_svd(a: Array, b: Array, s: float) -> tuple[Array, Array, Array]:
    """``(L, σ, R)`` with ``s·A@B = L·diag(σ)·R`` (σ descending), never forming ``A@B``.

    ``A = Q_a R_a``, ``Bᵀ = Q_b R_b`` (reduced QR), ``s·R_a R_bᵀ = U Σ Vᵀ`` (a ``(p, q)`` core,
    ``p, q ≤ r``), so ``s·A@B = (Q_a U) Σ (Q_b V)ᵀ`` with orthonormal columns on both sides.
    """
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))
    core = s * (ra @ jnp.swapaxes(rb, -1, -2))
    u, sv, vh = jnp.linalg.svd(core, full_matrices=False)
    return qa @ u, sv, vh @ jnp.swapaxes(qb, -1, -2)


@functools.partial(jax.jit, static_argnames="k")
def _truncate_kernel(a: Array, b: Array, s: Array, s_new: Array, k: int) -> tuple[Array, ...]:
    return _split(*factored_svd(a, b, s), k, s_new)


@functools.partial(jax.jit, static_argnames="k")
def _factorize_kernel(m: Array, s_new: Array, k: int) -> tuple[Array, ...]:
    u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
    return _split(u, sv, vh, k, s_new)


# ------------------------------------------------------------------------------ factored / exact

def weighted_sum(adapters: Sequence[Any], weights: Sequence[float], *, rank: int | None = None,
                 alpha: float | None = None, rslora: bool = False) -> Any:
    """One LoRA adapter whose update is exactly ``Σ_k w_k ΔW_k`` (concatenated factors).

    For every kernel targeted by any adapter (the result targets the union), with ``K`` the adapters
    that target it, ranks ``r_k``, scales ``s_k`` and the result's scale ``s``::

        A = [A_k for k in K]              concatenated along the rank axis   (*stack, in, Σ r_k)
        B = [w_k·s_k/s · B_k for k in K]  stacked along the rank axis        (*stack, Σ r_k, out)
        s·A@B = Σ_{k∈K} w_k·s_k·A_k@B_k = Σ_k w_k ΔW_k                        (exactly; no cross terms)

    Ranks, alphas, rsLoRA and targets may differ between adapters; stacked and multi-axis kernels work
    unchanged (factors carry the stack axes; the layout's matrix view is shared). Each result kernel
    is a ``LoRA(rank=Σ r_k, alpha=…)`` whose ``targets`` are the escaped paths it holds; by default
    ``alpha`` gives ``s = 1`` (``alpha = r``, ``√r`` with ``rslora``), as PEFT's ``cat`` combination
    (``lora_alpha = r``; PEFT folds ``w_k s_k`` into ``A_k``, which is the same product).
    Dropout carries over when the contributing methods agree (else 0); NF4 quantization and PiSSA
    init carry over (they must agree: they define the frozen base).

    Args:
      adapters: LoRA adapters of one frozen base (e.g. from :func:`lowrank_jax.init` or
        :func:`lowrank_jax.io.peft.load`; convert VeRA with :func:`as_lora` first).
      weights: one finite real per adapter (negative weights subtract an adapter).
      rank: if given, also :func:`truncate` the sum to this rank and return ``(adapter, report)``.
      alpha, rslora: scaling of the result method(s).

    Returns:
      the combined adapter, or ``(adapter, {path: Spectrum})`` when ``rank`` is given.

    Raises:
      TypeError for DoRA / VeRA nodes (naming the path and method) or a malformed ``adapters``;
      ValueError for ``weights`` of the wrong length or non-finite values, and for adapters of
      different frozen bases (naming the path and both kernel shapes / layouts / dtypes).

    Example:
      >>> import jax, lowrank_jax as lj
      >>> from lowrank_jax import arithmetic
      >>> params = {"mlp": {"kernel": jax.numpy.ones((16, 12))}, "out": {"kernel": jax.numpy.ones((12, 4))}}
      >>> _, a1 = lj.init(lj.LoRA(rank=4, targets="mlp/kernel"), params, jax.random.key(0))
      >>> _, a2 = lj.init(lj.LoRA(rank=2, targets=".*kernel"), params, jax.random.key(1))
      >>> s = arithmetic.weighted_sum([a1, a2], [1.0, -0.5])
      >>> s["mlp"]["kernel"].method.rank, s["out"]["kernel"].method.rank
      (6, 2)
      >>> small, report = arithmetic.weighted_sum([a1, a2], [1.0, -0.5], rank=3)
      >>> small["mlp"]["kernel"].a.shape, report["mlp/kernel"].discarded.shape
      ((16, 3), (3,))
    """
    what = "weighted_sum"
    adapters = _adapter_list(adapters, what)
    ws = _weights(weights, len(adapters), what)
    specs = []
    for path, (keys, contrib) in _collect(adapters, what).items():
        for k, node in contrib:
            _require_lora(what, path, node.method, f"adapters[{k}]")
        meta = _common_meta(what, path, contrib)
        r_sum = sum(node.method.rank for _, node in contrib)
        s = _scale(alpha, rslora, r_sum)
        a = jnp.concatenate([jnp.asarray(node["a"], F32) for _, node in contrib], axis=-1)
        b = jnp.concatenate([(ws[k] * node.method.scaling / s) * jnp.asarray(node["b"], F32)
                             for k, node in contrib], axis=-2)
        specs.append((path, keys, contrib[0][1], r_sum, meta, {"a": a, "b": b}))
    out = _nest(_lora_items(specs, alpha, rslora))
    if rank is None:
        return out
    return truncate(out, rank, alpha=alpha, rslora=rslora)


def truncate(adapter: Any, rank: int, *, alpha: float | None = None,
             rslora: bool = False) -> tuple[Any, dict[str, Spectrum]]:
    """Best rank-``k`` approximation of every LoRA kernel's ``ΔW`` by a factored SVD, and what it dropped.

    Per kernel (and per stacked layer), with ``ΔW = s·A@B``, ``A (in, r)``, ``B (r, out)``::

        A = Q_a R_a,  Bᵀ = Q_b R_b                       reduced QR: Q_a (in, p), Q_b (out, q), p, q ≤ r
        s·R_a R_bᵀ = U Σ Vᵀ                              SVD of the (p, q) core only
        ΔW = (Q_a U) Σ (Q_b V)ᵀ                          so σ(ΔW) = Σ (the rest are exactly 0)
        A' = (Q_a U)_{:, :k} √(Σ_k / s'),  B' = √(Σ_k / s') (Q_b V)ᵀ_{:k}      s'·A'@B' = ΔW_k

    ``ΔW_k`` is the best rank-k approximation in Frobenius and spectral norm (Eckart–Young); the full
    ``(in, out)`` matrix is never formed or decomposed. ``k = min(rank, r, in, out)`` per kernel (a
    kernel already at a lower rank keeps its rank, re-factored). The result nodes are
    ``LoRA(rank=k, alpha=…)`` (default ``alpha`` gives ``s' = 1``) with the layouts, shapes, dtypes,
    dropout, NF4 and PiSSA settings of the input.

    Returns:
      ``(truncated_adapter, {path: Spectrum})`` — the report holds the kept and discarded singular
      values of ``ΔW`` and the relative Frobenius error ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` per kernel.

    Example:
      >>> import jax, lowrank_jax as lj
      >>> from lowrank_jax import arithmetic
      >>> params = {"dense": {"kernel": jax.numpy.ones((10, 7))}}
      >>> _, ad = lj.init(lj.LoRA(rank=4), params, jax.random.key(0))
      >>> node = ad["dense"]["kernel"]
      >>> ad = {"dense": {"kernel": node.replace(b=jax.random.normal(jax.random.key(1), node.b.shape))}}
      >>> low, report = arithmetic.truncate(ad, 2)
      >>> low["dense"]["kernel"].method.rank, report["dense/kernel"].discarded.shape
      (2, (2,))
      >>> bool(0 < report["dense/kernel"].rel_error < 1)
      True
    """
    what = "truncate"
    rank = _check_rank(rank, what)
    specs, report = [], {}
    for path, keys, node in _nodes(adapter, what):
        _require_lora(what, path, node.method, "the adapter")
        n_in, n_out = node.layout.matrix_shape(node.shape)
        k = min(rank, node.method.rank, n_in, n_out)
        s_new = _scale(alpha, rslora, k)
        a, b, report[path] = _with_report(_truncate_kernel(jnp.asarray(node["a"], F32), jnp.asarray(node["b"], F32),
                                                           node.method.scaling, s_new, k))
        meta = _common_meta(what, path, [(0, node)])
        specs.append((path, keys, node, k, meta, {"a": a, "b": b}))
    return _nest(_lora_items(specs, alpha, rslora)), report


def _shared_of(frozen: Any, node: Any, path: str, what: str) -> Mapping:
    """The shared VeRA projections ``{"a": (r, max_in), "b": (max_out, r)}`` a node reads."""
    shared = frozen.get(lj.SHARED_KEY) if isinstance(frozen, Mapping) else None
    sh = shared.get(node.shared) if isinstance(shared, Mapping) else None
    if sh is None:
        raise ValueError(
            f"{what}: {path}: VeRA needs its shared projections {node.shared!r}, which live in the frozen "
            f"tree under lowrank_jax.SHARED_KEY ({lj.SHARED_KEY!r}); pass the frozen tree lowrank_jax.init "
            "or io.peft.load returned (or {SHARED_KEY: {name: {'a': A, 'b': B}}} from "
            "lowrank_jax.vera_projections(rank, max_in, max_out, seed))")
    return sh


def _vera_factors(frozen: Any, node: Any, path: str, what: str) -> tuple[Array, Array]:
    """Exact LoRA-form factors of a VeRA node: ``A = A_sh[:, :in]ᵀ ⊙ λ_d``, ``B = B_sh[:out]ᵀ ⊙ λ_b``."""
    sh = _shared_of(frozen, node, path, what)
    n_in, n_out = node.layout.matrix_shape(node.shape)
    a_sh, b_sh = jnp.asarray(sh["a"], F32), jnp.asarray(sh["b"], F32)
    r = node.method.rank
    if a_sh.shape[0] != r or b_sh.shape[-1] != r or a_sh.shape[1] < n_in or b_sh.shape[0] < n_out:
        raise ValueError(f"{what}: {path}: shared VeRA projections A {a_sh.shape} / B {b_sh.shape} do not cover "
                         f"rank {r} and this kernel's (in, out) = ({n_in}, {n_out})")
    a = a_sh[:, :n_in].T * jnp.asarray(node["lambda_d"], F32)[..., None, :]
    b = b_sh[:n_out].T * jnp.asarray(node["lambda_b"], F32)[..., None, :]
    return a, b


def as_lora(adapter: Any, frozen: Any = None) -> Any:
    """The adapter with every VeRA node rewritten as exact LoRA factors (LoRA nodes unchanged).

    VeRA's update is already a product of two rank-``r`` factors::

        ΔW = (A_shᵀ[:in] ⊙ λ_d) @ (B_shᵀ[:, :out] ⊙ λ_b) = 1 · A @ B,   A (in, r), B (r, out)

    so it becomes ``LoRA(rank=r, alpha=r)`` (``s = 1``) with ``merge`` unchanged (to float rounding).
    The result no longer reads the shared projections, so it combines with :func:`weighted_sum` and
    shrinks with :func:`truncate` (VeRA's ``r`` often exceeds ``min(in, out)``).

    Args:
      adapter: LoRA and/or VeRA nodes.
      frozen: the frozen tree holding the VeRA projections under ``lowrank_jax.SHARED_KEY``; only
        needed when the adapter has VeRA nodes.

    Raises ``TypeError`` for DoRA (not a product of factors) naming the path.
    """
    what = "as_lora"
    specs = []
    kept = []
    for path, keys, node in _nodes(adapter, what):
        kind = _kind(node.method)
        if kind == "lora":
            kept.append((keys, node))
            continue
        if kind != "vera":
            why = ("DoRA renormalises the columns of W0 + s·A@B; combine it densely with linear/ties/dare"
                   if kind == "dora" else "unsupported method")
            raise TypeError(f"{what}: {path}: {type(node.method).__name__} ({node.method!r}) has no exact LoRA "
                            f"form: {why}")
        a, b = _vera_factors(frozen, node, path, what)
        meta = (float(node.method.dropout), None, "kaiming_uniform")
        specs.append((path, keys, node, node.method.rank, meta, {"a": a, "b": b}))
    return _nest(kept + _lora_items(specs, None, False))


# ------------------------------------------------------------------------------------------ dense

class _Frozen:
    """Path-indexed view of one frozen tree (kernels, NF4 kernels, shared projections)."""

    def __init__(self, frozen: Any):
        self.tree = frozen
        leaves, _, index = _path_index(frozen)
        self.leaves = {p: leaves[i] for p, i in index.items()}

    def base_matrix(self, node: Any, path: str, what: str) -> Array:
        """``W0`` of ``node`` as a float32 ``(*stack, in, out)`` matrix (NF4 dequantized)."""
        if path not in self.leaves:
            raise ValueError(f"{what}: {path} is adapted but not in the frozen tree")
        leaf = self.leaves[path]
        n_in, n_out = node.layout.matrix_shape(node.shape)
        want = node.layout.stack_shape(node.shape) + (n_in, n_out)
        if _is_nf4(leaf):
            w = jnp.swapaxes(lj.nf4.dequantize(leaf, F32), -1, -2)
            if tuple(w.shape) != want:
                raise ValueError(f"{what}: {path}: the NF4 frozen kernel holds {tuple(w.shape)} (in, out) "
                                 f"matrices, the adapter expects {want}")
            return w
        if tuple(np.shape(leaf)) != node.shape:
            raise ValueError(f"{what}: {path}: the frozen kernel has shape {tuple(np.shape(leaf))} but the adapter "
                             f"was made for shape {node.shape}")
        return node.layout.to_matrix(jnp.asarray(leaf)).astype(F32)


def _lora_delta(node: Any) -> Array:
    """``s·A@B`` of a LoRA or DoRA node, float32 ``(*stack, in, out)``."""
    return node.method.scaling * (jnp.asarray(node["a"], F32) @ jnp.asarray(node["b"], F32))


def _delta_matrix(node: Any, path: str, frozen: _Frozen | None, what: str) -> Array:
    """``ΔW`` of one node, float32 ``(*stack, in, out)``: LoRA/VeRA in factored form, DoRA as ``W' − W0``."""
    kind = _kind(node.method)
    if kind == "lora":
        return _lora_delta(node)
    if kind in ("vera", "dora") and frozen is None:
        raise ValueError(f"{what}: {path}: {type(node.method).__name__} needs the frozen tree to form ΔW "
                         f"({'the shared projections' if kind == 'vera' else 'W0, since ΔW = m⊙V/‖V‖_col − W0'}); "
                         "pass frozen=")
    if kind == "vera":
        a, b = _vera_factors(frozen.tree, node, path, what)
        return a @ b
    if kind == "dora":
        w0 = frozen.base_matrix(node, path, what)
        v = w0 + _lora_delta(node)
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=-2))
        return v * (jnp.asarray(node["m"], F32) / norm)[..., None, :] - w0
    raise TypeError(f"{what}: {path}: unsupported method {node.method!r}")


def _frozen_per_adapter(frozen: Any, n: int, what: str) -> list[_Frozen | None]:
    if isinstance(frozen, (list, tuple)):
        if len(frozen) != n:
            raise ValueError(f"{what}: got {len(frozen)} frozen trees for {n} adapters; pass one frozen tree "
                             "(shared) or one per adapter")
        return [None if f is None else _Frozen(f) for f in frozen]
    view = None if frozen is None else _Frozen(frozen)
    return [view] * n


def _dense_combine(adapters: Sequence[Any], weights: Sequence[float], frozen: Any, what: str,
                   combine: Callable[[str, Any, list[int], Array, Array], Array]) -> dict:
    """Delta tree of ``combine(path, like_node, ks, Δ (K, *stack, in, out), w (K,))`` over the union."""
    adapters = _adapter_list(adapters, what)
    ws = _weights(weights, len(adapters), what)
    views = _frozen_per_adapter(frozen, len(adapters), what)
    items = []
    for path, (keys, contrib) in _collect(adapters, what).items():
        d = jnp.stack([_delta_matrix(node, path, views[k], what) for k, node in contrib])
        w = jnp.asarray([ws[k] for k, _ in contrib], F32)
        like = contrib[0][1]
        out = combine(path, like, [k for k, _ in contrib], d, w)
        items.append((keys, like.layout.from_matrix(out, like.shape)))
    return _nest(items)


def _bcast(w: Array, d: Array) -> Array:
    return w.reshape(w.shape + (1,) * (d.ndim - 1))


def _elect_and_merge(d: Array, w: Array, majority_sign: str) -> Array:
    """TIES steps 2–3 on stacked task updates ``d (K, …)`` (PEFT ``calculate_majority_sign_mask`` +
    ``disjoint_merge``): ``γ = sgn(Σ_k d_k)`` (``"total"``) or ``sgn(Σ_k sgn d_k)`` (``"frequency"``),
    ties to +1; ``out = Σ_k w_k d_k [sgn d_k = γ] / max(1, Σ_k [sgn d_k = γ])``."""
    sign = jnp.sign(d)
    votes = jnp.sum(d if majority_sign == "total" else sign, axis=0)
    elected = jnp.where(votes >= 0, 1.0, -1.0)
    agree = (sign == elected[None]).astype(F32)
    total = jnp.sum(_bcast(w, d) * d * agree, axis=0)
    return total / jnp.maximum(jnp.sum(agree, axis=0), 1.0)


def _check_majority(majority_sign: str, what: str) -> None:
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"{what}: majority_sign must be 'total' or 'frequency', got {majority_sign!r}")


def deltas(adapter: Any, frozen: Any = None) -> dict:
    """The dense update of every adapted kernel, kernel-shaped float32 ``ΔW`` (a *delta tree*).

    LoRA: ``s·A@B``; VeRA: ``(Aᵀ⊙λ_d)@(Bᵀ⊙λ_b)``; DoRA: ``m⊙V'/‖V'‖_col − W0`` — so
    ``add_delta(frozen, deltas(adapter, frozen)) == merge(frozen, adapter)`` up to float32 rounding.
    ``frozen`` is needed for VeRA (projections) and DoRA (``W0``). The tree mirrors the adapter's
    paths; each leaf has the kernel's shape (stack and multi-axis layout included).

    Example:
      >>> import jax, lowrank_jax as lj
      >>> from lowrank_jax import arithmetic
      >>> params = {"dense": {"kernel": jax.numpy.ones((5, 3))}}
      >>> frozen, ad = lj.init(lj.LoRA(rank=2), params, jax.random.key(0))
      >>> arithmetic.deltas(ad)["dense"]["kernel"].shape
      (5, 3)
    """
    return _dense_combine([adapter], [1.0], frozen, "deltas", lambda path, like, ks, d, w: d[0])


def linear(adapters: Sequence[Any], weights: Sequence[float], *, frozen: Any = None) -> dict:
    """Dense task arithmetic ``Σ_k w_k ΔW_k`` per kernel, as a delta tree (see :func:`deltas`).

    Unlike :func:`weighted_sum` this works for DoRA and VeRA too (each adapter's effective
    ``ΔW = W' − W0``); the result is dense — :func:`factorize` brings it back to low rank.
    ``frozen``: one frozen tree, or one per adapter (VeRA adapters of different inits hold different
    projections); needed for VeRA and DoRA only.
    """
    return _dense_combine(adapters, weights, frozen, "linear",
                          lambda path, like, ks, d, w: _linear_kernel(d, w))


def ties(adapters: Sequence[Any], weights: Sequence[float], *, density: float, frozen: Any = None,
         majority_sign: str = "total") -> dict:
    """TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models") on ``ΔW``.

    Per kernel and per layer, with task updates ``τ_k = ΔW_k`` of the adapters that target it
    (PEFT's ``ties`` / ``ties_svd`` math, ``peft.utils.merge_utils``)::

        1. trim:        τ̂_k = τ_k ⊙ [|τ_k| among the top ⌊density·in·out⌋ magnitudes of τ_k]
        2. elect sign:  γ = sgn(Σ_k τ̂_k)   ("total"; "frequency": sgn(Σ_k sgn τ̂_k)), 0 → +1
        3. disjoint mean: ΔW = Σ_k w_k τ̂_k [sgn τ̂_k = γ] / max(1, #{k: sgn τ̂_k = γ})

    The paper scales the merged vector by one λ; PEFT (and this function) apply per-task weights
    ``w_k`` before the disjoint mean and elect the sign on the unweighted ``τ̂_k`` — with equal
    weights ``w`` the two agree (``λ = w``). Adapters that do not target a kernel contribute nothing
    there (as a zero ``τ_k`` would). Trimming is per layer of a stacked kernel (each layer is a torch
    module in PEFT) over the whole ``(in, out)`` matrix.

    Args:
      density: fraction of each ``τ_k`` kept, in ``(0, 1]`` (1: no trimming).
      frozen: needed for VeRA and DoRA adapters (see :func:`linear`).
      majority_sign: ``"total"`` (the paper's) or ``"frequency"``.

    Returns a delta tree (kernel-shaped float32 ``ΔW``); :func:`add_delta` applies it,
    :func:`factorize` re-factorises it.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lj
      >>> from lowrank_jax import arithmetic
      >>> params = {"dense": {"kernel": jnp.zeros((4, 4))}}
      >>> def lora(b):
      ...     node = lj.AdapterParams({"a": jnp.eye(4)[:, :1], "b": jnp.asarray([b])}, lj.LoRA(rank=1, alpha=1.0),
      ...                             lj.Layout(), (4, 4), "float32")
      ...     return {"dense": {"kernel": node}}
      >>> # ΔW_k is zero except row 0; density 2/16 keeps (3, −2) of task 1 and (−4, 2) of task 2;
      >>> # column 0 votes 3 − 4 < 0, so only task 2's −4 survives there
      >>> d = arithmetic.ties([lora([3., 1., -2., 0.]), lora([-4., 2., -1.5, 0.])], [1.0, 1.0], density=0.125)
      >>> d["dense"]["kernel"][0].tolist()
      [-4.0, 2.0, -2.0, 0.0]
    """
    what = "ties"
    _check_majority(majority_sign, what)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"{what}: density must be a number in (0, 1] (the fraction of each update kept), "
                         f"got {density!r}")

    def combine(path, like, ks, d, w):
        return _ties_kernel(d, w, int(density * d.shape[-2] * d.shape[-1]), majority_sign)

    return _dense_combine(adapters, weights, frozen, what, combine)


@functools.partial(jax.jit, static_argnames=("keep", "majority_sign"))
def _ties_kernel(d: Array, w: Array, keep: int, majority_sign: str) -> Array:
    """Trim each ``d[k, layer]`` to its ``keep`` largest magnitudes, then elect and merge."""
    flat = d.reshape(d.shape[:-2] + (-1,))                           # (K, *stack, in·out)
    n = flat.shape[-1]
    if keep < n:
        rows = flat.reshape(-1, n)
        _, idx = jax.lax.top_k(jnp.abs(rows), keep)
        mask = jnp.zeros(rows.shape, bool).at[jnp.arange(rows.shape[0])[:, None], idx].set(True)
        flat = jnp.where(mask, rows, 0.0).reshape(flat.shape)
    return _elect_and_merge(flat.reshape(d.shape), w, majority_sign)


@functools.partial(jax.jit, static_argnames=("layout", "combine", "majority_sign"))
def _dare_kernel(d: Array, w: Array, masks: Array, p: Array, layout: Any, combine: str,
                 majority_sign: str) -> Array:
    """Kernel-shaped masks (K, *kernel) to the matrix view; drop and rescale ``d``; combine."""
    masks = jax.vmap(layout.to_matrix)(masks)
    kept = jnp.where(masks, d / (1.0 - p), 0.0)
    if combine == "ties":
        return _elect_and_merge(kept, w, majority_sign)
    return jnp.sum(_bcast(w, kept) * kept, axis=0)


@jax.jit
def _linear_kernel(d: Array, w: Array) -> Array:
    return jnp.sum(_bcast(w, d) * d, axis=0)


def dare_key(key: Array, k: int, path: str) -> Array:
    """The PRNG key of adapter ``k``'s DARE mask at ``path``: ``fold_in(fold_in(key, k), crc32(path))``."""
    return jax.random.fold_in(jax.random.fold_in(key, k), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def dare(adapters: Sequence[Any], weights: Sequence[float], *, p: float, key: Array, frozen: Any = None,
         combine: str = "linear", majority_sign: str = "total") -> dict:
    """DARE (Yu et al. 2023, "Language Models are Super Mario", Drop And REscale) on ``ΔW``.

    Per kernel, each task update ``τ_k = ΔW_k`` (kernel-shaped) is dropped element-wise with
    probability ``p`` and rescaled, so ``E[τ̃_k] = τ_k``::

        M_k ~ Bernoulli(1 − p)  (kernel shape; key dare_key(key, k, path) = fold_in(fold_in(key, k), crc32(path)))
        τ̃_k = M_k ⊙ τ_k / (1 − p)
        "linear":  ΔW = Σ_k w_k τ̃_k                                     (PEFT dare_linear)
        "ties":    sign election + disjoint mean of :func:`ties` on τ̃_k  (PEFT dare_ties; no trimming)

    PEFT's ``density`` is ``1 − p``. The mask of adapter ``k`` at a kernel depends only on ``key``,
    ``k`` and the path, so adding another adapter or kernel leaves it unchanged.

    Args:
      p: drop probability in ``[0, 1)`` (0: no dropping, equals :func:`linear`).
      key: an explicit ``jax.random`` key.
      frozen: needed for VeRA and DoRA adapters (see :func:`linear`).
      combine: ``"linear"`` or ``"ties"``; ``majority_sign`` as in :func:`ties`.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lj
      >>> from lowrank_jax import arithmetic
      >>> params = {"dense": {"kernel": jnp.zeros((64, 64))}}
      >>> _, ad = lj.init(lj.LoRA(rank=4, init="gaussian"), params, jax.random.key(0))
      >>> node = ad["dense"]["kernel"]
      >>> ad = {"dense": {"kernel": node.replace(b=jnp.ones_like(node.b))}}
      >>> d = arithmetic.dare([ad], [1.0], p=0.9, key=jax.random.key(1))["dense"]["kernel"]
      >>> 0.05 < float(jnp.mean(d != 0)) < 0.15      # about 1 − p of the entries survive
      True
    """
    what = "dare"
    _check_majority(majority_sign, what)
    if combine not in ("linear", "ties"):
        raise ValueError(f"{what}: combine must be 'linear' or 'ties', got {combine!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"{what}: p (the drop probability) must be a number in [0, 1), got {p!r}")
    if key is None or not hasattr(key, "dtype"):
        raise TypeError(f"{what}: key must be an explicit jax.random key (jax.random.key(seed)), got {key!r}")

    def fn(path, like, ks, d, w):
        masks = jnp.stack([jax.random.bernoulli(dare_key(key, k, path), 1.0 - p, like.shape) for k in ks])
        return _dare_kernel(d, w, masks, p, like.layout, combine, majority_sign)

    return _dense_combine(adapters, weights, frozen, what, fn)


def _delta_leaves(delta: Any, what: str) -> list[tuple[str, tuple, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(delta)
    if not flat:
        raise ValueError(f"{what}: the delta tree is empty")
    return [(_path_of(kp), tuple(_key_of(k) for k in kp), v) for kp, v in flat]


def add_delta(frozen: Any, delta: Any) -> Any:
    """Effective params ``W0 + ΔW`` for a delta tree (from :func:`deltas`, :func:`linear`, :func:`ties`,
    :func:`dare`): float32 sum, cast back to each kernel's dtype; other leaves unchanged; the
    ``SHARED_KEY`` entry dropped (as :func:`lowrank_jax.merge`).

    Raises ``ValueError`` naming the path for a delta path not in ``frozen``, a shape mismatch, or an
    NF4-quantized frozen kernel (dequantize it first, e.g. with ``lowrank_jax.merge``).
    """
    what = "add_delta"
    new, treedef, index = _path_index(frozen)
    for path, _, d in _delta_leaves(delta, what):
        if path not in index:
            shown = ", ".join(list(index)[:8])
            raise ValueError(f"{what}: delta path {path!r} is not in the frozen tree (paths include: {shown})")
        leaf = new[index[path]]
        if _is_nf4(leaf):
            raise ValueError(f"{what}: {path}: the frozen kernel is NF4-quantized; add the delta to its "
                             "dequantized value (lowrank_jax.merge returns full precision)")
        if tuple(np.shape(leaf)) != tuple(np.shape(d)):
            raise ValueError(f"{what}: {path}: the frozen kernel has shape {tuple(np.shape(leaf))} but the delta "
                             f"has shape {tuple(np.shape(d))}")
        new[index[path]] = (jnp.asarray(leaf, F32) + jnp.asarray(d, F32)).astype(jnp.asarray(leaf).dtype)
    return jax.tree_util.tree_unflatten(treedef, new)


def factorize(delta: Any, rank: int, *, like: Any, alpha: float | None = None,
              rslora: bool = False) -> tuple[Any, dict[str, Spectrum]]:
    """A rank-``k`` LoRA adapter from a delta tree by a full SVD per kernel, and the discarded spectrum.

    Per kernel and layer, ``ΔW = U Σ Vᵀ`` (the dense ``(in, out)`` SVD — the delta is already dense;
    for factored adapters use :func:`truncate`), ``A = U_k √(Σ_k/s)``, ``B = √(Σ_k/s) V_kᵀ``, ``k =
    min(rank, in, out)``; ``s·A@B`` is the best rank-k approximation (Eckart–Young).

    Args:
      delta: a delta tree (:func:`linear`, :func:`ties`, :func:`dare`, :func:`deltas`).
      rank: target rank.
      like: the adapter (or list of adapters) the delta came from: each delta path takes the layout,
        kernel shape and dtype (and dropout/NF4/PiSSA settings) of the nodes there.
      alpha, rslora: scaling of the result (default ``s = 1``).

    Returns ``(adapter, {path: Spectrum})``.
    """
    what = "factorize"
    rank = _check_rank(rank, what)
    likes = [like] if isinstance(like, Mapping) else _adapter_list(like, what)
    table = _collect(likes, what)
    specs, report = [], {}
    for path, keys, d in _delta_leaves(delta, what):
        if path not in table:
            raise ValueError(f"{what}: {path} is in the delta but in none of the `like` adapters; pass the "
                             "adapters the delta was computed from")
        contrib = table[path][1]
        node = contrib[0][1]
        if tuple(np.shape(d)) != node.shape:
            raise ValueError(f"{what}: {path}: the delta has shape {tuple(np.shape(d))} but the kernel has shape "
                             f"{node.shape}")
        n_in, n_out = node.layout.matrix_shape(node.shape)
        k = min(rank, n_in, n_out)
        a, b, report[path] = _with_report(_factorize_kernel(node.layout.to_matrix(jnp.asarray(d, F32)),
                                                            _scale(alpha, rslora, k), k))
        specs.append((path, keys, node, k, _common_meta(what, path, contrib), {"a": a, "b": b}))
    return _nest(_lora_items(specs, alpha, rslora)), report


# ---------------------------------------------------------------------------------------- unmerge

def unmerge(merged: Any, adapter: Any, *, frozen_like: Any = None,
            dora_base_norms: Mapping[str, Any] | None = None) -> Any:
    """Recover the frozen base ``W0`` from merged params ``W'`` and the adapter (inverse of ``merge``).

    * LoRA: ``W0 = W' − s·A@B``; VeRA: ``W0 = W' − (Aᵀ⊙λ_d)@(Bᵀ⊙λ_b)`` (projections from
      ``frozen_like``). Exact up to float32 rounding and the rounding of ``W'`` to the kernel's dtype.
    * DoRA: ``W' = m ⊙ V'/‖V'‖_col`` with ``V' = W0 + ΔV``, ``ΔV = s·A@B``. Merging discards
      ``c_j = ‖V'_j‖`` (one scalar per output column), so from ``W'`` and the adapter alone
      ``W0_j = c_j·W'_j/m_j − ΔV_j`` is known only up to that scalar: **not identifiable**, and this
      raises unless ``dora_base_norms`` gives ``n_j = ‖W0_j‖`` (e.g. saved with the adapter, or
      ``sqrt(sum(W0², axis=in))`` computed before merging). Then, with ``u = W'_j/m_j``,
      ``‖c·u − ΔV_j‖² = n_j²`` is a quadratic in ``c`` whose roots multiply to
      ``(‖ΔV_j‖² − n_j²)/‖u‖²``: when ``‖ΔV_j‖ < ‖W0_j‖`` (an update smaller than the weight it adapts —
      the usual case) exactly one root is positive,
      ``c = (⟨u, ΔV_j⟩ + sqrt(⟨u, ΔV_j⟩² − ‖u‖²(‖ΔV_j‖² − n_j²))) / ‖u‖²``, and ``W0_j = c·u − ΔV_j``.
      Otherwise (or for ``m_j = 0``) a ``ValueError`` names the path and columns. Not traceable by
      ``jax.jit`` (the checks need concrete values).

    Args:
      merged: params as :func:`lowrank_jax.merge` returns them (full precision; an NF4 re-quantized
        merge cannot be undone).
      adapter: the adapter that was merged.
      frozen_like: a frozen tree holding the VeRA projections under ``lowrank_jax.SHARED_KEY``
        (only its shared entry is read); needed for VeRA only.
      dora_base_norms: ``{path: ‖W0‖_col}`` of shape ``(*stack, out)`` (norm over the input axis of the
        ``(in, out)`` matrix view) for every DoRA kernel.

    Returns ``merged`` with every adapted kernel replaced by ``W0`` (same shapes and dtypes).

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lj
      >>> from lowrank_jax import arithmetic
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
      >>> frozen, ad = lj.init(lj.LoRA(rank=2), params, jax.random.key(1))
      >>> node = ad["dense"]["kernel"]
      >>> ad = {"dense": {"kernel": node.replace(b=jnp.ones_like(node.b))}}
      >>> back = arithmetic.unmerge(lj.merge(frozen, ad), ad)
      >>> bool(jnp.allclose(back["dense"]["kernel"], params["dense"]["kernel"], atol=1e-6))
      True
    """
    what = "unmerge"
    new, treedef, index = _path_index(merged)
    for path, _, node in _nodes(adapter, what):
        if path not in index:
            raise ValueError(f"{what}: adapter path {path!r} is not in the merged params")
        leaf = new[index[path]]
        if _is_nf4(leaf):
            raise ValueError(f"{what}: {path}: the merged kernel is NF4 (merge(..., requantize=True)); its "
                             "re-quantization rounding cannot be undone — unmerge a full-precision merge")
        if tuple(np.shape(leaf)) != node.shape:
            raise ValueError(f"{what}: {path}: the merged kernel has shape {tuple(np.shape(leaf))} but the adapter "
                             f"was made for shape {node.shape}")
        w = node.layout.to_matrix(jnp.asarray(leaf)).astype(F32)
        kind = _kind(node.method)
        if kind == "lora":
            w0 = w - _lora_delta(node)
        elif kind == "vera":
            a, b = _vera_factors(frozen_like, node, path, what)
            w0 = w - a @ b
        elif kind == "dora":
            w0 = _unmerge_dora(w, node, path, dora_base_norms, what)
        else:
            raise TypeError(f"{what}: {path}: unsupported method {node.method!r}")
        new[index[path]] = node.layout.from_matrix(w0, node.shape).astype(jnp.asarray(leaf).dtype)
    return jax.tree_util.tree_unflatten(treedef, new)


def _unmerge_dora(w: Array, node: Any, path: str, norms: Mapping[str, Any] | None, what: str) -> Array:
    """``W0`` from DoRA's ``W' = m⊙V'/‖V'‖_col`` given ``‖W0‖_col`` (see :func:`unmerge`)."""
    if norms is None or path not in norms:
        raise ValueError(
            f"{what}: {path}: DoRA cannot be unmerged from W' and the adapter alone: W' = m⊙V'/‖V'‖_col keeps "
            "only the direction of each column of V' = W0 + s·A@B and loses its norm ‖V'_j‖, so W0 is "
            "determined only up to one scalar per output column. Pass dora_base_norms={path: ‖W0‖_col} "
            "(shape (*stack, out)) to recover it")
    stack = node.layout.stack_shape(node.shape)
    _, n_out = node.layout.matrix_shape(node.shape)
    n0 = jnp.asarray(norms[path], F32)
    if tuple(n0.shape) != stack + (n_out,):
        raise ValueError(f"{what}: {path}: dora_base_norms has shape {tuple(n0.shape)}, expected "
                         f"{stack + (n_out,)} (‖W0‖ per output column)")
    m = jnp.asarray(node["m"], F32)
    if np.any(np.asarray(m) == 0):
        raise ValueError(f"{what}: {path}: DoRA magnitude m is 0 in column(s) "
                         f"{np.argwhere(np.asarray(m) == 0)[:5].tolist()}: W' carries no direction there")
    dv = _lora_delta(node)
    u = w / m[..., None, :]
    ud = jnp.sum(u * dv, axis=-2)
    uu = jnp.sum(u * u, axis=-2)
    dd = jnp.sum(dv * dv, axis=-2)
    bad = np.asarray(dd >= jnp.square(n0))
    if bad.any():
        ratio = float(np.max(np.sqrt(np.asarray(dd)) / np.maximum(np.asarray(n0), 1e-30)))
        raise ValueError(
            f"{what}: {path}: DoRA column(s) {np.argwhere(bad)[:5].tolist()} ({int(bad.sum())} in all) have "
            f"‖s·A@B‖_j ≥ ‖W0_j‖ (ratio up to {ratio:.3g}); then ‖W0_j‖ no longer picks a unique ‖V'_j‖ "
            "(both roots of the quadratic may be valid), so W0 is not identifiable there")
    c = (ud + jnp.sqrt(jnp.maximum(jnp.square(ud) - uu * (dd - jnp.square(n0)), 0.0))) / uu
    return c[..., None, :] * u - dv
