"""Adapters as files: ``save_adapter`` / ``load_adapter``.

An adapter is saved as a **directory** (like a PEFT adapter or a Hugging Face model folder) holding
two files and nothing else::

    my_adapter/
      adapter.safetensors   the trainable arrays, one tensor per array, named
                            "<node path>/<array>", e.g. "encoder/layer_0/attention/self/query/kernel/a"
      adapter.json          what they mean (below)

``adapter.json``::

    {"format": "lowrank_jax.adapter", "version": 1, "library_version": "0.1.0",
     "tensors": {"file": "adapter.safetensors", "bytes": 295064, "sha256": "…"},
     "nodes": [{"path": ["encoder", "layer_0", "attention", "self", "query", "kernel"],
                "method": {"class": "LoRA", "fields": {"rank": 8, "alpha": 16.0, "targets": ["…"],
                           "dropout": 0.0, "rslora": false, "init": "kaiming_uniform",
                           "quant": {"class": "NF4", "fields": {...}} | null}},
                "layout": {"in_axes": [0], "out_axes": [1], "stack": 0},
                "shape": [384, 384], "dtype": "float32", "shared": null,
                "arrays": {"a": {"tensor": "encoder/…/kernel/a", "shape": [384, 8], "dtype": "float32"}, …}},
               …],
     "metadata": {... user JSON ...},
     "checksum": "<sha256 of this object without 'checksum', canonical JSON>"}

Every node's static description (method with all its dataclass fields, layout, kernel shape and dtype,
VeRA shared-array name) is stored, so :func:`load_adapter` re-creates the ``AdapterParams`` nodes
exactly: same tree structure and aux data, bitwise the same arrays. No pickle; methods are rebuilt
only from known classes (LoRA, DoRA, VeRA, NF4, or ones registered with
:func:`~lowrank_jax.io.register_method`), whose constructors re-validate every field.

The frozen base is **not** saved (rebuild it from the base model; VeRA's shared projections are a
pure function of ``(rank, max_in, max_out, seed)``, see :func:`lowrank_jax.vera_projections`).

Writes are atomic: both files are written and fsynced in a temporary sibling directory, which is then
renamed to ``path``. Loads verify the sha256 of the tensor file and of the JSON, so flipped bytes,
truncation, or hand edits are reported as a ``ValueError`` naming the file and the defect.

Both files are untrusted input: every JSON value is type- and range-checked (``8.0`` is not an
integer, ``"false"`` is not a boolean, repeated keys, ``NaN`` and nesting deeper than 64 levels
are refused), the tensor file's size is compared with ``adapter.json`` before it is read, every
tensor must be named by exactly one array and every array must name its own tensor, and node paths
must read differently once ``/``-joined.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lowrank_jax.io import _format as fmt
from lowrank_jax.tree import fitted_nodes

__all__ = ["save_adapter", "load_adapter", "read_adapter_info", "check_adapter_fits",
           "ADAPTER_JSON", "ADAPTER_TENSORS"]

ADAPTER_JSON = "adapter.json"
ADAPTER_TENSORS = "adapter.safetensors"
FORMAT_NAME = "lowrank_jax.adapter"


def _library_version() -> str:
    try:
        import lowrank_jax
        return str(getattr(lowrank_jax, "__version__", "unknown"))
    except Exception:  # pragma: no cover
        return "unknown"


def save_adapter(path: str | os.PathLike, adapter: Any, *, metadata: Mapping[str, Any] | None = None,
                 overwrite: bool = True) -> Path:
    """Save ``adapter`` (nested dicts of ``AdapterParams``) as the directory ``path``.

    Args:
      path: directory to create (its parent is created if needed).
      adapter: the trainable adapter tree from :func:`lowrank_jax.init` (or after training).
      metadata: JSON-serializable user data stored in ``adapter.json`` (read it back with
        :func:`read_adapter_info`).
      overwrite: replace an existing adapter directory at ``path`` (one holding only this format's
        two files); a directory with other files in it is never replaced.

    Returns:
      ``Path(path)``.
    """
    path = Path(path)
    nodes, tensors = fmt.describe_adapter(adapter)
    blob = fmt.safetensors_dumps(tensors, {"format": "lowrank_jax", "content": "adapter"})
    try:
        meta = json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_adapter: metadata must be JSON-serializable: {e}") from None
    fmt.check_json_depth(meta, "save_adapter: metadata")
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "library_version": _library_version(),
        "tensors": {"file": ADAPTER_TENSORS, "bytes": len(blob), "sha256": _sha256(blob)},
        "nodes": nodes,
        "metadata": meta,
    }
    doc["checksum"] = fmt.canonical_sha256(doc)
    text = json.dumps(doc, indent=1, allow_nan=False).encode("utf-8")
    fmt.atomic_write_dir(path, {ADAPTER_TENSORS: blob, ADAPTER_JSON: text}, overwrite=overwrite,
                         replaceable=(ADAPTER_TENSORS, ADAPTER_JSON))
    return path


def _sha256(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _read_doc(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter directory")
    if path.is_file():
        raise ValueError(f"{path}: is a file; an adapter is a directory with {ADAPTER_JSON} and {ADAPTER_TENSORS}")
    jpath = path / ADAPTER_JSON
    if not jpath.exists():
        raise FileNotFoundError(f"{jpath}: missing (not a lowrank_jax adapter directory?)")
    doc = fmt.load_json(jpath.read_bytes(), str(jpath))
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ValueError(f"{jpath}: not a lowrank_jax adapter description (format is "
                         f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version > fmt.FORMAT_VERSION or version < 1:
        raise ValueError(f"{jpath}: format version {version!r} is not supported by this library "
                         f"(reads versions 1..{fmt.FORMAT_VERSION})")
    checksum = doc.pop("checksum", None)
    if checksum != fmt.canonical_sha256(doc):
        raise ValueError(f"{jpath}: checksum mismatch: the description was modified or corrupted "
                         f"(stored {checksum!r})")
    return doc


def read_adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """The verified ``adapter.json`` of an adapter directory (node descriptions, ``metadata``, …)."""
    return _read_doc(Path(path))


def load_adapter(path: str | os.PathLike, frozen: Any = None) -> dict:
    """Load an adapter saved by :func:`save_adapter`.

    Args:
      path: the adapter directory.
      frozen: optional frozen tree (from :func:`lowrank_jax.init` or the base params plus, for VeRA,
        the shared projections); when given, every adapter path must exist in it with a kernel of
        the shape the adapter was made for (see :func:`check_adapter_fits`).

    Returns:
      The adapter: nested dicts of ``AdapterParams`` equal to the saved one (structure, aux data and
      array bits), arrays as ``jax.Array`` on the default device.

    Raises:
      FileNotFoundError: no such directory / file.
      ValueError: corrupt, truncated or inconsistent files, unknown format version, or an adapter
        that does not fit ``frozen`` — the message names the file or path and the problem.
    """
    path = Path(path)
    doc = _read_doc(path)
    jpath = path / ADAPTER_JSON
    tinfo = doc.get("tensors")
    if not isinstance(tinfo, dict) or tinfo.get("file") != ADAPTER_TENSORS:
        raise ValueError(f"{jpath}: malformed 'tensors' entry {tinfo!r}")
    size = fmt.json_int(tinfo.get("bytes"), str(jpath), "tensors.bytes", lo=0)
    digest = fmt.json_str(tinfo.get("sha256"), str(jpath), "tensors.sha256")
    tpath = path / ADAPTER_TENSORS
    if not tpath.exists():
        raise FileNotFoundError(f"{tpath}: missing")
    on_disk = tpath.stat().st_size
    if on_disk != size:  # checked before reading: a huge file is never read into memory
        raise ValueError(f"{tpath}: truncated or extended: {on_disk} bytes, {jpath.name} says {size}")
    blob = tpath.read_bytes()
    if _sha256(blob) != digest:
        raise ValueError(f"{tpath}: corrupted: sha256 of the file does not match the one recorded in {jpath.name}")
    tensors, _ = fmt.safetensors_loads(blob, str(tpath))
    used: set[str] = set()

    def fetch(tname: str, spec: dict, pstr: str, name: str) -> jax.Array:
        if tname not in tensors:
            raise ValueError(f"{tpath}: tensor {tname!r} (array {name!r} of {pstr}) is missing")
        arr = tensors[tname]
        if list(arr.shape) != list(spec["shape"]) or arr.dtype.name != spec["dtype"]:
            raise ValueError(f"{tpath}: tensor {tname!r} is {arr.dtype.name}{list(arr.shape)} but {jpath.name} "
                             f"says {spec['dtype']}{spec['shape']}")
        used.add(tname)
        return jnp.asarray(arr)

    adapter = fmt.build_adapter(doc.get("nodes"), fetch, str(jpath))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{tpath}: holds tensors no node of {jpath.name} names: {extra[:5]}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    if frozen is not None:
        check_adapter_fits(adapter, frozen, where=str(path))
    return adapter


def check_adapter_fits(adapter: Any, frozen: Any, *, where: str = "adapter") -> None:
    """Raise ``ValueError`` unless every adapter node fits ``frozen`` — the same check as
    :func:`lowrank_jax.merge` and :func:`lowrank_jax.apply` (:func:`lowrank_jax.tree.check_fit`): the
    path exists, the kernel (or NF4 kernel) has the node's shape and layout, every array has the shape
    its method declares, VeRA/DVoRA find their shared projections large enough and of their rank.
    Messages name the path and both shapes.
    """
    fitted_nodes(frozen, adapter, where)

