"""The per-weight adapter node: the trainable arrays of one adapted kernel plus what they mean.

An adapter pytree is a nested dict that mirrors the params tree on the adapted paths only; at each
adapted kernel's key it holds one :class:`AdapterParams`. Its *children* are the trainable arrays
(``a``, ``b`` for LoRA; ``a``, ``b``, ``m`` for DoRA; ``lambda_d``, ``lambda_b`` for VeRA) and its
static *aux data* is the method, the kernel :class:`~lowrank_jax.layout.Layout`, shape and dtype — so
``merge(frozen, adapter)`` needs nothing else, ``jax.grad``/``optax`` see only the arrays, and a jitted
function is retraced whenever the method changes (the aux data is part of the tree structure).

    >>> import jax, jax.numpy as jnp, lowrank_jax as lj
    >>> params = {"layer_0": {"query": {"kernel": jnp.ones((16, 8))}}}
    >>> _, adapter = lj.init(lj.LoRA(rank=2, targets=".*query/kernel"), params, jax.random.key(0))
    >>> node = adapter["layer_0"]["query"]["kernel"]
    >>> node["a"].shape, node.b.shape   # dict-style and attribute access both work
    ((16, 2), (2, 8))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from lowrank_jax.layout import Layout


@jax.tree_util.register_pytree_with_keys_class
class AdapterParams(Mapping):
    """Trainable arrays of one adapted kernel (children) + ``method``/``layout``/``shape``/``dtype`` (static).

    Attributes:
      params: ``{name: array}``, e.g. ``{"a": (in, r), "b": (r, out)}`` (with leading stack axes for
        stacked kernels). Names are sorted so flattening order is deterministic.
      method: the (hashable) method value that created the arrays, e.g. ``LoRA(rank=8, ...)``.
      layout: how the kernel maps to ``(*stack, in, out)`` matrices.
      shape: full shape of the adapted kernel (stack axes included).
      dtype: name of the adapted kernel's dtype (the dtype ``merge`` returns).
      shared: key of the frozen shared arrays this adapter reads (VeRA projections), else ``None``.
    """

    __slots__ = ("params", "method", "layout", "shape", "dtype", "shared")

    def __init__(
        self,
        params: Mapping[str, Any],
        method: Any,
        layout: Layout,
        shape: tuple[int, ...],
        dtype: str,
        shared: str | None = None,
    ):
        object.__setattr__(self, "params", {k: params[k] for k in sorted(params)})
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "dtype", str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype)
        object.__setattr__(self, "shared", shared)

    def __setattr__(self, name, value):
        raise AttributeError("AdapterParams is immutable; use .replace(**arrays)")

    # Mapping interface over the trainable arrays.
    def __getitem__(self, key: str):
        return self.params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return object.__getattribute__(self, "params")[name]
        except (KeyError, AttributeError):
            raise AttributeError(f"AdapterParams has no array {name!r}") from None

    def replace(self, **arrays) -> "AdapterParams":
        """A copy with some arrays replaced (same static description)."""
        unknown = set(arrays) - set(self.params)
        if unknown:
            raise KeyError(f"unknown adapter arrays {sorted(unknown)}; this node has {sorted(self.params)}")
        return AdapterParams({**self.params, **arrays}, self.method, self.layout, self.shape, self.dtype,
                             self.shared)

    @property
    def aux(self) -> tuple:
        return (tuple(self.params), self.method, self.layout, self.shape, self.dtype, self.shared)

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(k), v) for k, v in self.params.items()]
        return children, self.aux

    def tree_flatten(self):
        return list(self.params.values()), self.aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, method, layout, shape, dtype, shared = aux
        node = object.__new__(cls)
        object.__setattr__(node, "params", dict(zip(names, children)))
        object.__setattr__(node, "method", method)
        object.__setattr__(node, "layout", layout)
        object.__setattr__(node, "shape", shape)
        object.__setattr__(node, "dtype", dtype)
        object.__setattr__(node, "shared", shared)
        return node

    def __repr__(self) -> str:
        arrays = ", ".join(
            f"{k}={getattr(v, 'dtype', type(v).__name__)}{list(getattr(v, 'shape', ()))}"
            for k, v in self.params.items()
        )
        return f"AdapterParams({type(self.method).__name__}, kernel{list(self.shape)}, {arrays})"


def is_adapter(x: Any) -> bool:
    """``is_leaf`` predicate that stops tree traversal at adapter nodes."""
    return isinstance(x, AdapterParams)
