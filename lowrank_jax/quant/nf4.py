"""NF4 (4-bit NormalFloat) weight quantization, bit-compatible with bitsandbytes.

This module reproduces ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` /
``dequantize_4bit`` (bitsandbytes 0.50.2, CPU path) in ``jax.numpy`` so that quantization and
dequantization run under ``jax.jit``, and it reads/writes the ``bnb.nn.Linear4bit`` state-dict
layout so that weights quantized here load into bitsandbytes (and vice versa).

Notation for one matrix ``W`` with ``n`` elements, flattened row-major into ``w`` and cut into
blocks of ``B = block_size`` consecutive elements (the last block may be shorter)::

    absmax_b = max_{i in block b} |w_i|                                (fp32)
    s_i      = clamp(w_i * (1 / absmax_b), -1, 1)                      (fp32, reciprocal multiply)
    q_i      = #{k : s_i > m_k},  m_k = (c_k + c_{k+1}) / 2            (nearest NF4 code c_q,
                                                                        exact ties -> lower code)
    byte_j   = (q_{2j} << 4) | q_{2j+1}                                (first element in the HIGH nibble)
    w'_i     = c[q_i] * absmax_b                                       (fp32, then cast to the dtype)

Double quantization (bnb ``compress_statistics=True``) additionally stores the block scales in
8 bits::

    offset   = sum_b(absmax_b) / n_blocks                              (fp32, per matrix)
    d_b      = absmax_b - offset
    nested_k = max_{b in 256-block k} |d_b|
    v_b      = clamp(d_b * (1 / nested_k), -1, 1)
    a_b      = #{j : v_b >= t_j}                                        (uint8 code into dyn)
    absmax_b = fl(dyn[a_b] * nested_{b // 256}) + offset                (reconstruction)

where ``dyn = DYNAMIC_MAP_SIGNED`` and ``t_j`` are the decision steps of bitsandbytes' CPU 8-bit
quantizer, which snaps ``(1 + v) / 2`` to a 65536-point grid and looks up the midpoint-nearest code
of the grid point: ``t_j`` is within ~1.5e-5 of the midpoint ``(dyn_j + dyn_{j+1}) / 2`` (see
:func:`_bnb_cpu_8bit_thresholds`).  An all-zero 256-block of ``d`` stores ``nested = 0`` and
codes 0 (reconstructing ``absmax = offset``), as bitsandbytes does.

Two quirks of the bitsandbytes CPU path are reproduced on purpose (they matter only for bit
exactness): the *short last block* is scaled by true division ``w_i / absmax`` instead of the
reciprocal multiply, and its stored absmax is clamped to ``>= 1e-38`` (so an all-zero short last
block stores ``1e-38``, an all-zero full block stores ``0``).  An all-zero block quantizes to code 7
(the exact 0.0 of the code book) and dequantizes to zeros, never NaN.

Leading *batch* dimensions are supported so that a stack of layers ``(L, out, in)`` can be
quantized matrix by matrix (``batch_dims=1``) and sliced by ``jax.lax.scan`` / ``nn.scan``: every
array child of :class:`NF4Array` carries the batch dims in front, the static aux data describes one
matrix only.

Everything is written so that eager and ``jax.jit`` results are bit-identical (XLA may turn a
division by a constant into a reciprocal multiply and contract ``a * b + c`` into an FMA; both are
blocked where bitsandbytes rounds separately).

Note on ``offset``: bitsandbytes computes it with ``torch.mean`` (fp32, PyTorch's own
vectorised summation order, which depends on the CPU's vector width).  Here it is
``sum(absmax) / n_blocks`` in fp32 with XLA's reduction order, so it can differ from bitsandbytes by a
few ulps (0–4 on the random matrices of tests/test_nf4.py), which can move a uint8 absmax code by one
step of the dynamic map (that block's scale then differs by < 1 % of ``nested_absmax``).  Given the
same offset, the codes are bit-identical; a state dict written by bitsandbytes is always loaded exactly.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NF4_CODE",
    "DYNAMIC_MAP_SIGNED",
    "NF4Array",
    "quantize",
    "quantize_flagged",
    "finite_flag",
    "describe_non_finite",
    "dequantize",
    "all_finite",
    "nf4_matmul",
    "to_bnb_state_dict",
    "from_bnb_state_dict",
    "save_bnb_safetensors",
    "load_bnb_safetensors",
]

# --------------------------------------------------------------------------------------------
# Code books
# --------------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


#: The 16 NF4 code values (fp32), index = 4-bit code, ascending (bitsandbytes order).
NF4_CODE: np.ndarray = _readonly(
    np.array(
        [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ],
        dtype=np.float32,
    )
)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """fp32 ``linspace`` with PyTorch's CPU rounding.

    ``step = (end - start) / (steps - 1)`` in fp32; element ``i`` is ``fma(step, i, start)`` for
    ``i < steps // 2`` and ``fma(-step, steps - 1 - i, end)`` otherwise (one rounding each; the
    product of an fp32 and a small integer is exact in float64, so float64 evaluation followed by
    a cast to fp32 reproduces the fused multiply-add).
    """
    a, e = np.float32(start), np.float32(end)
    step = np.float64((e - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lo = step * i + np.float64(a)
    hi = np.float64(e) - step * (steps - 1 - i)
    return np.where(np.arange(steps) < steps // 2, lo, hi).astype(np.float32)


def _dynamic_map_signed() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``).

    For exponent level ``i = 0..6`` (scale ``10^(i-6)``): the ``2^i`` midpoints of the fp32 grid
    ``linspace(0.1, 1, 2^i + 1)``, multiplied in fp32 by ``+scale`` and by ``-scale``; plus ``0`` and
    ``1.0``; sorted ascending -> 256 fp32 values.
    """
    vals: list[np.ndarray] = [np.array([0.0, 1.0], dtype=np.float32)]
    for i in range(7):
        grid = _torch_linspace_f32(0.1, 1.0, 2**i + 1)
        means = (grid[:-1] + grid[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (i - 6))
        vals.append(means * scale)
        vals.append(-scale * means)
    out = np.sort(np.concatenate(vals))
    assert out.shape == (256,) and out.dtype == np.float32
    return out


#: bitsandbytes' 256-entry signed dynamic 8-bit map (fp32, ascending), used by double quant.
DYNAMIC_MAP_SIGNED: np.ndarray = _readonly(_dynamic_map_signed())

# NF4 decision thresholds (fp32 midpoints): q = #{k : s > m_k} == searchsorted(m, s, side="left").
_NF4_MIDPOINTS: np.ndarray = _readonly((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2.0))


def _bnb_cpu_8bit_thresholds(code: np.ndarray) -> np.ndarray:
    """Decision thresholds of bitsandbytes' CPU 8-bit blockwise quantizer for ``code``.

    The bnb CPU kernel (used for the double-quant statistics) does not search the code book per
    value.  With ``v = clamp(d * (1 / absmax), -1, 1)`` it computes, in fp32,
    ``u = (1 + v) * 0.5`` and ``i = trunc(fma(65535, u, 0.5))`` (``u`` rounded to a 65536-point
    grid) and returns ``LUT[i]``, where ``LUT[i]`` is the midpoint-nearest code (ties -> lower) of the
    grid value ``g_i = 2 i / 65535 - 1``.  The result is a monotone step function of ``v``; this
    returns its 255 steps ``t_k`` = the smallest fp32 ``v`` whose code exceeds ``k``, so that
    ``code(v) = #{k : v >= t_k}`` = ``searchsorted(t, v, side="right")``.  ``t_k`` lies within one
    grid step (about 1.5e-5) of the midpoint ``(c_k + c_{k+1}) / 2``; near 0, where codes are closer
    than the grid, several codes are unreachable (equal thresholds).
    """
    f32 = np.float32
    mid = ((code[:-1] + code[1:]) * f32(0.5)).astype(f32)
    grid = np.arange(65536, dtype=f32) * f32(2.0) / f32(65535.0) - f32(1.0)
    lut = np.searchsorted(mid, grid, side="left")

    def code_of(v: np.ndarray) -> np.ndarray:
        u = ((f32(1.0) + v) * f32(0.5)).astype(f32)  # a multiple of 2^-25: 65535 u + 0.5 is
        e = (u.astype(np.float64) * 65535.0 + 0.5).astype(f32)  # exact in f64 -> one f32 rounding
        return lut[e.astype(np.int64) & 0xFFFF]

    def key(x: np.ndarray) -> np.ndarray:  # order-preserving int64 key of fp32 values
        b = x.astype(f32).view(np.int32).astype(np.int64)
        return np.where(b < 0, -(b & 0x7FFFFFFF), b)

    def unkey(k: np.ndarray) -> np.ndarray:
        return np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32).view(f32)

    ks = np.arange(code.shape[0] - 1)
    lo = np.full(ks.shape, key(np.array(-1.0, f32)))  # code(lo) <= k
    hi = np.full(ks.shape, key(np.array(1.0, f32)))  # code(hi) > k
    while np.any(hi - lo > 1):  # bisection on the ordered fp32 values
        m = (lo + hi) // 2
        up = code_of(unkey(m)) > ks
        hi, lo = np.where(up, m, hi), np.where(up, lo, m)
    return unkey(hi)


_DYN_THRESHOLDS: np.ndarray = _readonly(_bnb_cpu_8bit_thresholds(DYNAMIC_MAP_SIGNED))

# Pair look-up table: byte -> (NF4[byte >> 4], NF4[byte & 15]); dequantization is one gather.
_NF4_PAIRS: np.ndarray = _readonly(
    np.stack([np.repeat(NF4_CODE, 16), np.tile(NF4_CODE, 16)], axis=-1)
)

_NESTED_BLOCK = 256
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_ZERO_TAIL_ABSMAX = np.float32(1e-38)  # bnb clamps the short last block's absmax to this

# --------------------------------------------------------------------------------------------
# NF4Array pytree
# --------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_with_keys_class
class NF4Array:
    """An NF4-quantized matrix (or a stack of them), immutable pytree node.

    Array children (leading ``batch_shape`` dims first, identical for all children):

    * ``packed``: uint8 ``(*batch, ceil(n / 2))``, two 4-bit codes per byte, first in the high nibble.
    * ``absmax``: float32 ``(*batch, n_blocks)`` block scales, or uint8 codes into
      :data:`DYNAMIC_MAP_SIGNED` when ``double_quant``.
    * ``nested_absmax``: float32 ``(*batch, ceil(n_blocks / 256))`` or ``None``.
    * ``offset``: float32 ``(*batch,)`` or ``None``.

    Static aux data (per matrix; the batch dims are *not* part of it so that ``lax.scan`` slices
    give a valid one-layer ``NF4Array``): ``shape``, ``dtype`` (name of the original dtype),
    ``block_size``, ``double_quant``.  Here ``n = prod(shape)`` and
    ``n_blocks = ceil(n / block_size)``.

    When the array stores a Flax kernel (made by :func:`lowrank_jax.quantize`), three more static
    fields say how to turn the stored torch-layout ``(out, in)`` matrix back into it:
    ``kernel_layout`` (the per-layer :class:`~lowrank_jax.Layout`, ``stack=0``), ``kernel_shape``
    (the per-layer kernel shape) and ``compute_dtype`` (the dtype a layer dequantizes to, ``None``:
    the original dtype). They are ``None`` for a plain matrix quantized with :func:`quantize`.
    """

    __slots__ = ("packed", "absmax", "nested_absmax", "offset", "shape", "dtype", "block_size",
                 "double_quant", "kernel_layout", "kernel_shape", "compute_dtype")

    packed: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    shape: tuple[int, ...]
    dtype: str
    block_size: int
    double_quant: bool
    kernel_layout: Any
    kernel_shape: tuple[int, ...] | None
    compute_dtype: str | None

    def __init__(self, packed: Any, absmax: Any, nested_absmax: Any, offset: Any, *,
                 shape: tuple[int, ...], dtype: str, block_size: int, double_quant: bool,
                 kernel_layout: Any = None, kernel_shape: tuple[int, ...] | None = None,
                 compute_dtype: str | None = None):
        # No validation of the children here: jax rebuilds pytrees with tracers / placeholders as
        # children; :func:`check` validates a concrete or abstract array before use.
        for name, value in (("packed", packed), ("absmax", absmax),
                            ("nested_absmax", nested_absmax), ("offset", offset),
                            ("shape", tuple(int(s) for s in shape)), ("dtype", str(dtype)),
                            ("block_size", int(block_size)),
                            ("double_quant", bool(double_quant)),
                            ("kernel_layout", kernel_layout),
                            ("kernel_shape", None if kernel_shape is None else tuple(int(s) for s in kernel_shape)),
                            ("compute_dtype", compute_dtype)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"NF4Array is immutable (tried to set {name!r})")

    # -- pytree protocol ---------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        GA = jax.tree_util.GetAttrKey
        children = ((GA("packed"), self.packed), (GA("absmax"), self.absmax),
                    (GA("nested_absmax"), self.nested_absmax), (GA("offset"), self.offset))
        return children, self._aux()

    def _aux(self) -> tuple:
        return (self.shape, self.dtype, self.block_size, self.double_quant, self.kernel_layout,
                self.kernel_shape, self.compute_dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, block_size, double_quant, kernel_layout, kernel_shape, compute_dtype = aux
        packed, absmax, nested_absmax, offset = children
        return cls(packed, absmax, nested_absmax, offset, shape=shape, dtype=dtype,
                   block_size=block_size, double_quant=double_quant, kernel_layout=kernel_layout,
                   kernel_shape=kernel_shape, compute_dtype=compute_dtype)

    def replace(self, **changes: Any) -> "NF4Array":
        """A copy with some children or static fields replaced."""
        fields = {"packed": self.packed, "absmax": self.absmax, "nested_absmax": self.nested_absmax,
                  "offset": self.offset, "shape": self.shape, "dtype": self.dtype,
                  "block_size": self.block_size, "double_quant": self.double_quant,
                  "kernel_layout": self.kernel_layout, "kernel_shape": self.kernel_shape,
                  "compute_dtype": self.compute_dtype}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"NF4Array.replace: unknown fields {sorted(unknown)}")
        fields.update(changes)
        return NF4Array(fields.pop("packed"), fields.pop("absmax"), fields.pop("nested_absmax"),
                        fields.pop("offset"), **fields)

    # -- derived properties ------------------------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading stack dims (``packed.shape[:-1]``)."""
        return tuple(self.packed.shape[:-1])

    @property
    def size(self) -> int:
        """Number of weights of one matrix, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """``ceil(size / block_size)``."""
        return -(-self.size // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: sum of the array children's ``nbytes``."""
        return sum(int(np.dtype(c.dtype).itemsize) * math.prod(c.shape)
                   for c in (self.packed, self.absmax, self.nested_absmax, self.offset)
                   if c is not None)

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / (prod(batch_shape) * size)`` (4.5 for block 64, ~4.127 with double quant)."""
        return 8.0 * self.nbytes / (math.prod(self.batch_shape) * self.size)

    def __repr__(self) -> str:
        return (f"NF4Array(shape={self.shape}, batch_shape={self.batch_shape}, dtype={self.dtype}, "
                f"block_size={self.block_size}, double_quant={self.double_quant})")


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be a positive even int, got {block_size!r} "
                        f"of type {type(block_size).__name__}")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    return int(block_size)


def _check_float_dtype(dtype: Any, what: str) -> str:
    name = jnp.dtype(dtype).name
    if name not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must have a floating dtype in {_FLOAT_DTYPES}, got {name}")
    return name


def describe_non_finite(x: Any) -> str:
    """``"N non-finite value(s) (NaN/inf); first at index (i, j, ...): v"`` for a concrete array ``x`` with
    NaN/inf values (the index in ``x``'s own axes, row-major first); ``""`` when every value is finite.

    >>> describe_non_finite(jnp.array([[1.0, 2.0], [jnp.inf, jnp.nan]]))
    '2 non-finite value(s) (NaN/inf); first at index (1, 0): inf'
    """
    x = jnp.asarray(x)
    bad = ~jnp.isfinite(x)
    count = int(jnp.sum(bad))
    if not count:
        return ""
    idx = tuple(int(i) for i in np.unravel_index(int(jnp.argmax(bad.reshape(-1))), x.shape))
    return f"{count} non-finite value(s) (NaN/inf); first at index {idx}: {x[idx]}"


def _raise_not_finite(x: jax.Array) -> None:
    """Raise ValueError naming the count and first index of the non-finite values of a concrete ``x``, or,
    when ``x`` is finite, the overflow of its double-quantization statistics."""
    detail = describe_non_finite(x)
    if detail:
        raise ValueError(f"cannot quantize x: it contains {detail}")
    raise ValueError("cannot quantize x with double_quant=True: the mean of its block scales overflows "
                     f"float32 (max |x| = {float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32))))}); "
                     "use double_quant=False")


def _check_nf4(q: Any, what: str = "q") -> None:
    if not isinstance(q, NF4Array):
        raise TypeError(f"{what} must be an NF4Array, got {type(q).__name__}")
    check(q, what)


def check(q: NF4Array, what: str = "NF4Array") -> None:
    """Raise ``ValueError`` naming ``what`` unless ``q``'s children fit its static description.

    Checked (shapes and dtypes only, so it works on tracers and abstract arrays): ``packed`` is
    uint8 ``(*batch, ceil(n/2))``; ``absmax`` is float32 ``(*batch, n_blocks)`` (uint8 codes under
    double quantization, with float32 ``nested_absmax (*batch, ceil(n_blocks/256))`` and ``offset
    (*batch,)``, both ``None`` otherwise); ``block_size`` positive and even; ``dtype`` a float
    dtype; a kernel layout, if any, consistent with ``shape``. A hand-built or edited array that
    breaks any of these would otherwise dequantize to garbage.
    """
    def fail(msg: str) -> None:
        raise ValueError(f"{what}: {msg} ({q!r})")

    if q.block_size <= 0 or q.block_size % 2:
        fail(f"block_size must be a positive even number, got {q.block_size}")
    if q.dtype not in _FLOAT_DTYPES:
        fail(f"dtype must be one of {_FLOAT_DTYPES}, got {q.dtype!r}")
    if len(q.shape) < 1 or any(d < 1 for d in q.shape):
        fail(f"shape must be non-empty with positive dims, got {q.shape}")
    for name in ("packed", "absmax"):
        if not hasattr(getattr(q, name), "shape"):
            fail(f"{name} must be an array, got {type(getattr(q, name)).__name__}")
    batch = tuple(q.packed.shape[:-1])
    if q.packed.ndim < 1 or jnp.dtype(q.packed.dtype) != jnp.uint8 or q.packed.shape[-1] != -(-q.size // 2):
        fail(f"packed must be uint8 (*batch, {-(-q.size // 2)}), got {q.packed.dtype}{tuple(q.packed.shape)}")
    want_abs = (jnp.uint8 if q.double_quant else jnp.float32)
    if tuple(q.absmax.shape) != batch + (q.n_blocks,) or jnp.dtype(q.absmax.dtype) != want_abs:
        fail(f"absmax must be {jnp.dtype(want_abs).name}{batch + (q.n_blocks,)} for block_size {q.block_size}, "
             f"double_quant={q.double_quant}; got {q.absmax.dtype}{tuple(q.absmax.shape)}")
    if q.double_quant:
        n_nested = -(-q.n_blocks // _NESTED_BLOCK)
        for name, want in (("nested_absmax", batch + (n_nested,)), ("offset", batch)):
            v = getattr(q, name)
            if v is None or tuple(getattr(v, "shape", ())) != want or jnp.dtype(v.dtype) != jnp.float32:
                fail(f"double_quant=True needs {name} float32{want}, got "
                     f"{None if v is None else f'{v.dtype}{tuple(v.shape)}'}")
    elif q.nested_absmax is not None or q.offset is not None:
        fail("double_quant=False but nested_absmax/offset are set")
    if q.kernel_layout is not None or q.kernel_shape is not None:
        if q.kernel_layout is None or q.kernel_shape is None:
            fail("kernel_layout and kernel_shape must be given together")
        if len(q.kernel_shape) != q.kernel_layout.ndim or q.kernel_layout.stack != 0:
            fail(f"kernel_shape {q.kernel_shape} does not fit kernel_layout {q.kernel_layout}")
        n_in, n_out = q.kernel_layout.matrix_shape(q.kernel_shape)
        if q.shape != (n_out, n_in):
            fail(f"a kernel of shape {q.kernel_shape} with {q.kernel_layout} is the (out, in) matrix "
                 f"{(n_out, n_in)}, but shape is {q.shape}")


# --------------------------------------------------------------------------------------------
# Quantize
# --------------------------------------------------------------------------------------------


def _nearest_nf4(s: jax.Array) -> jax.Array:
    """``q = #{k : s > m_k}`` over the 15 fp32 midpoints: nearest NF4 code, exact ties -> lower."""
    q = jnp.zeros(s.shape, jnp.uint8)
    for m in _NF4_MIDPOINTS:  # unrolled compares fuse into one elementwise op
        q = q + (s > m).astype(jnp.uint8)
    return q


def finite_flag(x: jax.Array) -> jax.Array:
    """Whether every element of ``x`` is finite, as a boolean scalar array: ``Σ_i x_i · 0 == 0``.

    ``x · 0`` is ``±0`` for finite ``x`` and NaN for NaN/±inf, and NaN survives the sum.  One vectorized
    float reduction: XLA:CPU runs ``all(isfinite(x))`` (a boolean reduction) several times slower, and
    eagerly it is two programs per shape.  XLA does not fold ``x · 0`` for floats (not an IEEE identity).

    >>> bool(finite_flag(jnp.array([1.0, 2.0]))), bool(finite_flag(jnp.array([1.0, jnp.inf])))
    (True, False)
    """
    return jnp.sum(jnp.asarray(x, jnp.float32) * jnp.float32(0.0)) == 0


def _count_at_most(table: np.ndarray, v: jax.Array) -> jax.Array:
    """``#{k : table_k <= v}`` per element of ``v`` for an ascending (not necessarily strictly) fp32
    ``table``: ``searchsorted(table, v, side="right")`` as an unrolled branch-free binary search.

    With ``table`` padded by ``+inf`` to ``2^L - 1`` entries, ``c`` starts at 0 and, for
    ``step = 2^(L-1), ..., 1``, becomes ``c + step`` where ``table[c + step - 1] <= v``: L gathers in
    one elementwise fusion (XLA:CPU compiles ``jnp.searchsorted``'s loop about 0.04 s slower and
    runs it 4x slower on the double-quant statistics).

    >>> int(_count_at_most(np.array([0.0, 0.0, 1.0], np.float32), jnp.float32(0.0)))
    2
    """
    levels = max(1, int(table.shape[0]).bit_length())
    padded = np.full(2 ** levels - 1, np.inf, np.float32)
    padded[: table.shape[0]] = table
    padded = jnp.asarray(padded)
    c = jnp.zeros(v.shape, jnp.int32)
    for level in reversed(range(levels)):  # take + lax.select: jnp indexing/where per level trace slower
        nxt = c + (1 << level)
        t = jnp.take(padded, nxt - 1, mode="clip")  # 0 <= nxt - 1 < 2^L - 1: clip is a no-op
        c = jax.lax.select(t <= v, nxt, c)
    return c


def _blockwise_absmax_scale(x: jax.Array, n: int, block_size: int, *, tail_divide: bool,
                            clamp_zero_tail: bool) -> tuple[jax.Array, jax.Array]:
    """Blocks of the last axis of ``x`` (fp32, ``(*batch, n)``).

    Returns ``absmax (*batch, n_blocks)`` and ``s = clamp(x * (1 / absmax), -1, 1)`` shaped
    ``(*batch, n_blocks, block_size)`` (zero padded).  With ``tail_divide`` the short last block is
    ``x / absmax`` instead.  ``absmax == 0`` gives ``s = 0`` (never NaN).  With ``clamp_zero_tail`` an
    all-zero short last block stores ``absmax = 1e-38``.
    """
    batch = x.shape[:-1]
    nb = -(-n // block_size)
    rem = n % block_size
    xb = jnp.pad(x, [(0, 0)] * len(batch) + [(0, nb * block_size - n)])
    xb = xb.reshape(*batch, nb, block_size)
    absmax = jnp.max(jnp.abs(xb), axis=-1)  # zero padding does not change max|.|
    # absmax > 2^126: 1/absmax is subnormal, which XLA:CPU flushes to 0 (also inside its division), so the
    # block would silently quantize to zeros. There both factors are scaled by the exact power of two 2^-32
    # (s unchanged, the reciprocal normal); elsewhere the factor is 1 and the bits are unchanged. (bnb
    # keeps the subnormal reciprocal, whose lower precision may round such a block's codes differently.)
    down = jnp.where(absmax > jnp.float32(2.0 ** 126), jnp.float32(2.0 ** -32), jnp.float32(1.0))
    safe = jnp.where(absmax > 0, absmax * down, jnp.float32(1.0))
    recip = jnp.where(absmax > 0, jnp.float32(1.0) / safe, jnp.float32(0.0))
    xd = xb * down[..., None]
    s = xd * recip[..., None]  # s_i = w_i * (1 / absmax_b)
    if rem and tail_divide:
        tail = jnp.where(absmax[..., -1:, None] > 0, xd[..., -1:, :] / safe[..., -1:, None],
                         jnp.float32(0.0))  # s_i = w_i / absmax_last
        s = jnp.concatenate([s[..., :-1, :], tail], axis=-2)
    if rem and clamp_zero_tail:
        last = jnp.where(absmax[..., -1] > 0, absmax[..., -1], _ZERO_TAIL_ABSMAX)
        absmax = absmax.at[..., -1].set(last)
    return absmax, jnp.clip(s, -1.0, 1.0)


def _quantize_impl(x: jax.Array, mshape: tuple[int, ...], block_size: int, double_quant: bool
                   ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None, jax.Array]:
    """``(packed, absmax, nested, offset, finite)``; ``finite``: every element of ``x`` is finite
    (:func:`finite_flag`, fused with the quantizer's pass; XLA:CPU's max ignores NaN, so absmax alone
    cannot tell)."""
    batch = x.shape[: x.ndim - len(mshape)]
    n = math.prod(mshape)
    xf = x.reshape(*batch, n).astype(jnp.float32)
    finite = finite_flag(xf)
    absmax, s = _blockwise_absmax_scale(xf, n, block_size, tail_divide=True, clamp_zero_tail=True)
    # odd n: the pad element has s = 0 -> code 7 (bnb pads the scaled values with 0)
    codes = _nearest_nf4(s).reshape(*batch, -1)[..., : n + n % 2]
    # (q_2j << 4) | q_2j+1 as a 2-term sum: XLA:CPU vectorizes this reduction, while the strided
    # even/odd slices of `pairs[..., 0] << 4 | pairs[..., 1]` made packing 4x slower than the rest
    pairs = codes.reshape(*batch, -1, 2)
    packed = jnp.sum(pairs * jnp.array([16, 1], jnp.uint8), axis=-1, dtype=jnp.uint8)
    if not double_quant:
        return packed, absmax, None, None, finite
    nb = absmax.shape[-1]
    # offset = mean_b absmax_b  (one block: copied, so a subnormal 1e-38 survives XLA's FTZ)
    # A true division like torch's: XLA rewrites `/ constant` into `* (1 / constant)` under jit,
    # so the divisor gets a (numerically void) data dependency.
    total = jnp.sum(absmax, axis=-1)
    offset = absmax[..., 0] if nb == 1 else total / (jnp.float32(nb) + jnp.float32(0.0) * total)
    d = absmax - offset[..., None]
    nested, sd = _blockwise_absmax_scale(d, nb, _NESTED_BLOCK, tail_divide=False,
                                         clamp_zero_tail=False)
    qa = _count_at_most(_DYN_THRESHOLDS, sd)  # #{k : t_k <= v}
    qa = jnp.where(nested[..., None] > 0, qa, 0)  # an all-zero 256-block stores code 0 (bnb)
    qa = qa.astype(jnp.uint8).reshape(*batch, -1)[..., :nb]
    # finite x with |x| near float32's max: the scales' mean (offset) can overflow to inf. (With x and the
    # offset finite, |absmax - offset| <= max(absmax, offset) is finite, so `nested` is too.)
    finite = finite & jnp.all(jnp.isfinite(offset))
    return packed, qa, nested, offset, finite


# one compiled program per (shape, dtype, config) instead of op-by-op dispatch; inlined under jit
_quantize_jit = jax.jit(_quantize_impl, static_argnums=(1, 2, 3))


def quantize(x: Any, block_size: int = 64, double_quant: bool = False, *,
             batch_dims: int = 0) -> NF4Array:
    """Quantize ``x`` to NF4 exactly like ``bitsandbytes.functional.quantize_4bit(x,
    quant_type="nf4", blocksize=block_size, compress_statistics=double_quant)``.

    Each matrix ``x[i...]`` over the leading ``batch_dims`` axes is quantized on its own (see the
    module docstring for the formulas).  A Flax ``(in, out)`` kernel must be transposed to the torch
    ``(out, in)`` layout first to reproduce bitsandbytes' bytes and blocks.

    Args:
        x: float32 / bfloat16 / float16 array, ``(*batch, *shape)``.
        block_size: elements per absmax block (positive, even; bnb uses 32..4096).
        double_quant: also quantize the block scales (8-bit dynamic map, blocks of 256).
        batch_dims: number of leading stack axes (``0 <= batch_dims < x.ndim``).

    Raises:
        ValueError: ``x`` contains NaN/inf (count and first index named), or is empty.

    Under ``jax.jit`` the NaN/inf check is skipped (it needs concrete values); use
    :func:`quantize_flagged` to get the check's flag as an array.  With ``double_quant`` a finite ``x`` whose
    block scales' mean overflows float32 (values near 3.4e38) is refused too.
    """
    q, finite = quantize_flagged(x, block_size, double_quant, batch_dims=batch_dims)
    if not _is_tracer(finite) and not bool(finite):
        _raise_not_finite(jnp.asarray(x))
    return q


def quantize_flagged(x: Any, block_size: int = 64, double_quant: bool = False, *,
                     batch_dims: int = 0) -> tuple[NF4Array, jax.Array]:
    """:func:`quantize` without the host check: ``(q, finite)``, ``finite`` a boolean scalar array —
    whether every element of ``x`` is finite (and, with ``double_quant``, the scale statistics too) —
    computed in the same compiled pass.

    For callers that quantize many kernels and check every flag in one transfer at the end (no host
    synchronisation per kernel), or that quantize under ``jax.jit``.  A ``False`` flag means ``q`` is
    garbage: the caller must raise.

    >>> import jax.numpy as jnp
    >>> q, ok = quantize_flagged(jnp.array([[1.0, jnp.nan]]))
    >>> bool(ok)
    False
    """
    block_size = _check_block_size(block_size)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, (int, np.integer)):
        raise TypeError(f"batch_dims must be an int, got {batch_dims!r}")
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize expects a floating-point array, got dtype {x.dtype}")
    dtype = _check_float_dtype(x.dtype, "x")
    if not 0 <= batch_dims < x.ndim:
        raise ValueError(f"batch_dims must satisfy 0 <= batch_dims < x.ndim = {x.ndim} "
                         f"(at least one matrix axis), got {batch_dims}")
    mshape = tuple(int(s) for s in x.shape[batch_dims:])
    if math.prod(mshape) == 0 or math.prod(x.shape[:batch_dims]) == 0:
        raise ValueError(f"cannot quantize an empty array of shape {tuple(x.shape)}")
    if not _is_tracer(x):
        x = jnp.asarray(x)
    packed, absmax, nested, offset, finite = _quantize_jit(x, mshape, block_size, bool(double_quant))
    return NF4Array(packed, absmax, nested, offset, shape=mshape, dtype=dtype,
                    block_size=block_size, double_quant=bool(double_quant)), finite


# --------------------------------------------------------------------------------------------
# Dequantize
# --------------------------------------------------------------------------------------------


def _expand_blocks(vals: jax.Array, scale: jax.Array, n: int, block: int) -> jax.Array:
    """``out_i = vals_i * scale[..., i // block]`` for the first ``n`` entries of ``vals``."""
    batch = vals.shape[:-1]
    nb = scale.shape[-1]
    total = nb * block
    if vals.shape[-1] == total:
        out = vals.reshape(*batch, nb, block) * scale[..., None]
        out = out.reshape(*batch, total)
    else:
        padded = jnp.pad(vals[..., : min(total, vals.shape[-1])],
                         [(0, 0)] * len(batch) + [(0, max(0, total - vals.shape[-1]))])
        out = (padded.reshape(*batch, nb, block) * scale[..., None]).reshape(*batch, total)
    return out[..., :n] if total != n else out


def _absmax_f32(q: NF4Array, dep: jax.Array | None = None) -> jax.Array:
    """Block scales in fp32: ``absmax_b = dyn[a_b] * nested[b // 256] + offset`` under double quant.

    ``dep`` (a scalar) is added as ``0·dep`` to the dynamic map, the first op of the scale decode, so
    that a backward re-dequantization cannot share the decoded scales with the forward one.
    """
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    dyn = jnp.asarray(DYNAMIC_MAP_SIGNED)
    if dep is not None:
        dyn = dyn + jnp.float32(0.0) * dep
    dq = dyn[q.absmax.astype(jnp.int32)]
    scaled = _expand_blocks(dq, q.nested_absmax.astype(jnp.float32), q.n_blocks, _NESTED_BLOCK)
    # bnb rounds the product before adding the offset.  Inside a jit fusion XLA:CPU may contract
    # `a * b + c` into one FMA (one rounding), which moves results by an ulp; a select between
    # the multiply and the add (a no-op: the product is never NaN) blocks the contraction.
    scaled = jnp.where(jnp.isnan(scaled), jnp.float32(0.0), scaled)
    return scaled + q.offset.astype(jnp.float32)[..., None]


def _dequantize_f32(q: NF4Array, pairs_lut: jax.Array) -> jax.Array:
    """``w_i = NF4[q_i] * absmax[i // block_size]`` in fp32, shape ``(*batch, *q.shape)``.

    The first op is a single gather ``pairs_lut[packed] -> (*batch, n/2, 2)`` (both nibbles at
    once), so a data dependency injected into ``pairs_lut`` reaches the start of the chain.
    """
    batch = q.batch_shape
    vals = pairs_lut[q.packed.astype(jnp.int32)].reshape(*batch, -1)  # (*batch, 2*ceil(n/2))
    # pairs_lut carries any fake data dependency; pass it on to the scale decode too
    w = _expand_blocks(vals, _absmax_f32(q, pairs_lut[0, 0]), q.size, q.block_size)
    return w.reshape(*batch, *q.shape)


def all_finite(q: NF4Array) -> jax.Array:
    """Whether every dequantized value of ``q`` is finite, from its scales alone (a boolean scalar array).

    ``w_i = NF4[code_i] · absmax_b`` with ``|NF4[k]| ≤ 1``, so ``w`` is finite iff every block scale is;
    under double quantization ``absmax_b = dyn[a_b] · nested + offset`` with a finite 8-bit map, so it is
    the ``nested_absmax`` and ``offset`` floats that must be. Reads ``n / block_size`` values, not ``n``.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.ones((4, 64)))
    >>> bool(all_finite(q)), bool(all_finite(q.replace(absmax=q.absmax.at[0].set(jnp.inf))))
    (True, False)
    """
    _check_nf4(q)
    scales = [q.nested_absmax, q.offset] if q.double_quant else [q.absmax]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(jnp.asarray(s, jnp.float32))) for s in scales]))


def dequantize(q: NF4Array, dtype: Any = None) -> jax.Array:
    """Dequantize: ``NF4_CODE[code] * absmax[block]`` in fp32, then cast to ``dtype``.

    ``dtype`` defaults to the original dtype ``q.dtype``; the result has shape
    ``(*q.batch_shape, *q.shape)``.  Matches ``bitsandbytes.functional.dequantize_4bit``.
    """
    _check_nf4(q)
    out_dtype = _check_float_dtype(q.dtype if dtype is None else dtype, "dtype")
    return _dequantize_jit(q, out_dtype)


@partial(jax.jit, static_argnums=(1,))
def _dequantize_jit(q: NF4Array, out_dtype: str) -> jax.Array:
    return _dequantize_f32(q, jnp.asarray(_NF4_PAIRS)).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# Memory-lean quantized matmul
# --------------------------------------------------------------------------------------------


def _mm(x: jax.Array, w: jax.Array, contract_w: int) -> jax.Array:
    """``x @ w.T`` (contract_w=1) or ``x @ w`` (contract_w=0) over x's last axis."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (contract_w,)), ((), ())))


def _dependent_lut(v: jax.Array) -> jax.Array:
    """The pair LUT plus a fake data dependency on ``v``: ``LUT + 0 * v[0, ..., 0]``.

    XLA never folds a float ``0 * t`` (t could be NaN/inf), so every op of a dequant chain that
    starts from this LUT must run after ``v`` exists and is distinct (no CSE) from a chain that
    depends on another value.  ``t`` is ``v[0, ..., 0]`` with NaN/inf replaced by 0, so a
    non-finite first element cannot poison the weight.
    """
    lut = jnp.asarray(_NF4_PAIRS)
    if v.size == 0:
        return lut
    t = v[(0,) * v.ndim].astype(jnp.float32)
    return lut + jnp.float32(0.0) * jnp.where(jnp.isfinite(t), t, jnp.float32(0.0))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nf4_mm(x: jax.Array, q: NF4Array, compute_dtype: str, x_dtype: str,
            transpose: bool) -> jax.Array:
    # Forward dequant depends on x: XLA cannot hoist every layer's dequant to the program start
    # (which would keep all of them alive at once).
    w = _dequantize_f32(q, _dependent_lut(x)).astype(compute_dtype)
    return _mm(x.astype(compute_dtype), w, 1 if transpose else 0)


def _nf4_mm_fwd(x, q, compute_dtype, x_dtype, transpose):
    # Residuals: only the quantized arrays -- neither x nor the dequantized weight.
    return _nf4_mm(x, q, compute_dtype, x_dtype, transpose), q


def _nf4_mm_bwd(compute_dtype, x_dtype, transpose, q, g):
    # Backward re-dequantizes with a fake dependency on the cotangent at the FIRST op of the
    # chain (the pair LUT the gather reads): it can be neither CSE'd with the forward dequant nor
    # scheduled before g exists -> one layer's dequantized weight alive at a time.
    w = _dequantize_f32(q, _dependent_lut(g)).astype(compute_dtype)
    # y = x @ W.T  =>  dx = g @ W ;  y = x @ W  =>  dx = g @ W.T
    dx = _mm(g.astype(compute_dtype), w, 0 if transpose else 1).astype(x_dtype)
    return dx, None  # no gradient for the frozen quantized weight (float0/zeros via None)


_nf4_mm.defvjp(_nf4_mm_fwd, _nf4_mm_bwd)
# traced once per (shapes, dtypes, config): identical layers share the trace (lowering time)
_nf4_mm_jit = jax.jit(_nf4_mm, static_argnums=(2, 3, 4))


def nf4_matmul(x: jax.Array, q: NF4Array, *, compute_dtype: Any = None,
               transpose: bool = True) -> jax.Array:
    """``y = x @ dequantize(q).T`` (``transpose=True``, q stores a torch ``(out, in)`` matrix) or
    ``y = x @ dequantize(q)`` (``transpose=False``, q stores an ``(in, out)`` matrix).

    ``x`` is ``(..., in)`` and is cast to ``compute_dtype`` (default ``x.dtype``); the weight is
    dequantized in fp32 and cast to ``compute_dtype`` (as ``bnb.nn.Linear4bit`` does).  The
    result has dtype ``compute_dtype``.

    This is a ``jax.custom_vjp``: the only residuals are q's arrays, the backward computes
    ``dx = g @ W`` (resp. ``g @ W.T``) from a fresh dequantization that depends on ``g``, and the
    quantized weight gets no gradient.  In an unrolled model, only one layer's dequantized weight
    is alive at a time (see ``qlora_memory.md``).
    """
    _check_nf4(q)
    if q.batch_shape:
        raise ValueError(f"nf4_matmul needs a single matrix, got an NF4Array with batch_shape "
                         f"{q.batch_shape} (slice it, e.g. with jax.lax.scan)")
    if len(q.shape) != 2:
        raise ValueError(f"nf4_matmul needs a 2-D quantized matrix, got shape {q.shape}")
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        x = jnp.asarray(x)
    x_dtype = _check_float_dtype(x.dtype, "x")
    cd = x_dtype if compute_dtype is None else _check_float_dtype(compute_dtype, "compute_dtype")
    k = q.shape[1] if transpose else q.shape[0]
    if x.ndim < 1 or x.shape[-1] != k:
        layout = "(out, in) with transpose=True" if transpose else "(in, out) with transpose=False"
        raise ValueError(f"x.shape[-1] must equal the weight's input size {k} (q.shape={q.shape}, "
                         f"{layout}), got x.shape={tuple(x.shape)}")
    return _nf4_mm_jit(x, q, cd, x_dtype, bool(transpose))


# --------------------------------------------------------------------------------------------
# bitsandbytes state dicts / safetensors
# --------------------------------------------------------------------------------------------

_QS_KEY = "weight.quant_state.bitsandbytes__nf4"
_BASE_KEYS = frozenset({"weight", "weight.absmax", "weight.quant_map", _QS_KEY})
_NESTED_KEYS = frozenset({"weight.nested_absmax", "weight.nested_quant_map"})


def to_bnb_state_dict(q: NF4Array) -> dict[str, np.ndarray]:
    """The ``bnb.nn.Linear4bit`` weight entries of a state dict (keys relative to the module).

    ``weight`` uint8 ``(ceil(n/2), 1)``, ``weight.absmax`` (fp32, or uint8 with double quant),
    ``weight.quant_map`` (16 fp32), with double quant ``weight.nested_absmax`` (fp32) and
    ``weight.nested_quant_map`` (256 fp32), and ``weight.quant_state.bitsandbytes__nf4``: uint8
    bytes of the JSON ``{"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize",
    "nested_dtype", "nested_offset"]}`` exactly as bitsandbytes writes it.
    """
    _check_nf4(q)
    if q.batch_shape:
        raise ValueError(f"to_bnb_state_dict needs a single matrix, got batch_shape {q.batch_shape}")
    qs: dict[str, Any] = {"quant_type": "nf4", "blocksize": q.block_size, "dtype": q.dtype,
                          "shape": list(q.shape)}
    sd = {
        "weight": np.asarray(q.packed, dtype=np.uint8).reshape(-1, 1),
        "weight.absmax": np.asarray(q.absmax),
        "weight.quant_map": NF4_CODE.copy(),
    }
    if q.double_quant:
        sd["weight.nested_absmax"] = np.asarray(q.nested_absmax, dtype=np.float32)
        sd["weight.nested_quant_map"] = DYNAMIC_MAP_SIGNED.copy()
        qs.update(nested_blocksize=_NESTED_BLOCK, nested_dtype="float32",
                  nested_offset=float(np.asarray(q.offset, dtype=np.float32)))
    sd[_QS_KEY] = np.frombuffer(json.dumps(qs).encode("utf-8"), dtype=np.uint8).copy()
    return sd


def _expect_shape(sd: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...],
                  dtype: Any) -> np.ndarray:
    a = np.asarray(sd[key])
    if a.shape != shape or a.dtype != np.dtype(dtype):
        raise ValueError(f"state dict entry {key!r}: expected {np.dtype(dtype).name} {shape}, "
                         f"got {a.dtype} {a.shape}")
    return a


def from_bnb_state_dict(sd: Mapping[str, Any]) -> NF4Array:
    """Inverse of :func:`to_bnb_state_dict`; accepts a bitsandbytes ``Linear4bit`` weight state
    dict (keys relative to the module, values numpy arrays or CPU tensors; e.g. a ``bias`` entry
    is not allowed -- pass only the ``weight*`` keys)."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"state dict must be a mapping, got {type(sd).__name__}")
    keys = set(sd)
    if _QS_KEY not in keys:
        raise ValueError(f"state dict has no {_QS_KEY!r} entry (is it an NF4 bnb weight?); "
                         f"keys: {sorted(keys)}")
    raw = np.asarray(sd[_QS_KEY])
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{_QS_KEY!r} must be a 1-D uint8 array, got {raw.dtype} {raw.shape}")
    try:
        qs = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{_QS_KEY!r} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(qs, dict):
        raise ValueError(f"{_QS_KEY!r} must hold a JSON object, got {qs!r}")
    double_quant = "nested_offset" in qs
    expected = _BASE_KEYS | (_NESTED_KEYS if double_quant else frozenset())
    if keys != expected:
        raise ValueError(f"state dict keys: expected {sorted(expected)}, got {sorted(keys)} "
                         f"(missing {sorted(expected - keys)}, unexpected {sorted(keys - expected)})")
    want_qs = {"quant_type", "blocksize", "dtype", "shape"} | (
        {"nested_blocksize", "nested_dtype", "nested_offset"} if double_quant else set())
    if set(qs) != want_qs:
        raise ValueError(f"quant state JSON keys: expected {sorted(want_qs)}, got {sorted(qs)}")
    if qs["quant_type"] != "nf4":
        raise ValueError(f"quant_type must be 'nf4', got {qs['quant_type']!r}")
    block_size = _check_block_size(qs["blocksize"])
    if qs["dtype"] not in _FLOAT_DTYPES:
        raise ValueError(f"quant state dtype must be one of {_FLOAT_DTYPES}, got {qs['dtype']!r}")
    shape = qs["shape"]
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"quant state shape must be a non-empty list of positive ints, got {shape!r}")
    shape = tuple(shape)
    n = math.prod(shape)
    nb = -(-n // block_size)
    packed = _expect_shape(sd, "weight", ((n + 1) // 2, 1), np.uint8).reshape(-1)
    qmap = _expect_shape(sd, "weight.quant_map", (16,), np.float32)
    if not np.array_equal(qmap, NF4_CODE):
        raise ValueError("weight.quant_map is not the NF4 code book (NF4_CODE)")
    nested = offset = None
    if double_quant:
        if qs["nested_blocksize"] != _NESTED_BLOCK or qs["nested_dtype"] != "float32":
            raise ValueError(f"nested_blocksize/nested_dtype must be 256/'float32', got "
                             f"{qs['nested_blocksize']!r}/{qs['nested_dtype']!r}")
        absmax = _expect_shape(sd, "weight.absmax", (nb,), np.uint8)
        nested = _expect_shape(sd, "weight.nested_absmax", (-(-nb // _NESTED_BLOCK),), np.float32)
        nmap = _expect_shape(sd, "weight.nested_quant_map", (256,), np.float32)
        if not np.array_equal(nmap, DYNAMIC_MAP_SIGNED):
            raise ValueError("weight.nested_quant_map is not the signed dynamic map "
                             "(DYNAMIC_MAP_SIGNED)")
        if not isinstance(qs["nested_offset"], (int, float)):
            raise ValueError(f"nested_offset must be a number, got {qs['nested_offset']!r}")
        offset = jnp.asarray(np.float32(qs["nested_offset"]))
        nested = jnp.asarray(nested)
    else:
        absmax = _expect_shape(sd, "weight.absmax", (nb,), np.float32)
    return NF4Array(jnp.asarray(packed), jnp.asarray(absmax), nested, offset, shape=shape,
                    dtype=qs["dtype"], block_size=block_size, double_quant=double_quant)


def save_bnb_safetensors(path: str | os.PathLike, tensors: Mapping[str, NF4Array]) -> None:
    """Write ``{prefix: NF4Array}`` as a bitsandbytes-style safetensors file.

    Keys are ``f"{prefix}.{k}"`` for every ``k`` of :func:`to_bnb_state_dict` (``k`` alone for an
    empty prefix).  The file is written to a temporary file in the same directory and moved into
    place with ``os.replace`` (atomic on POSIX).
    """
    from safetensors.numpy import save_file

    flat: dict[str, np.ndarray] = {}
    for prefix, q in tensors.items():
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}")
        _check_nf4(q, f"tensors[{prefix!r}]")
        for k, v in to_bnb_state_dict(q).items():
            flat[f"{prefix}.{k}" if prefix else k] = np.ascontiguousarray(v)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_bnb_safetensors(path: str | os.PathLike) -> dict[str, NF4Array]:
    """Read every NF4 weight of a bitsandbytes safetensors file as ``{prefix: NF4Array}``.

    A prefix is found by its ``{prefix}.weight.quant_state.bitsandbytes__nf4`` key; tensors that
    belong to no NF4 weight (biases, unquantized layers) are ignored.
    """
    from safetensors.numpy import load_file

    flat = load_file(os.fspath(path))
    suffix = "." + _QS_KEY
    out: dict[str, NF4Array] = {}
    for key in flat:
        if key == _QS_KEY:
            prefix = ""
        elif key.endswith(suffix):
            prefix = key[: -len(suffix)]
        else:
            continue
        head = f"{prefix}." if prefix else ""
        sub = {k[len(head):]: v for k, v in flat.items()
               if k.startswith(head) and k[len(head):] in (_BASE_KEYS | _NESTED_KEYS)}
        out[prefix] = from_bnb_state_dict(sub)
    return out
