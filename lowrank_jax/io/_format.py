"""Shared plumbing of the file formats: safetensors bytes, JSON descriptions of adapter nodes, atomic writes.

Nothing here is pickled or ``eval``-ed: arrays travel as raw little-endian bytes in the safetensors
layout, everything else as JSON whose values are re-validated by the method classes' own
constructors on load.

safetensors layout (https://github.com/huggingface/safetensors). Written here without the library:
``safetensors.numpy.load`` / ``safetensors.flax.load`` of bytes raise ``KeyError: 'BF16'`` in
safetensors 0.8 (bfloat16 adapters over bf16 bases must round-trip), and every defect of a file must
be reported precisely. Files written here are read by the library (and PEFT) unchanged::

    [8 bytes: N, little-endian uint64][N bytes: JSON header, space-padded][data bytes]
    header = {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}

``data_offsets`` are relative to the start of the data section; the tensors tile it exactly, without
gaps or overlaps, and the file ends with the last tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.layout import Layout

# ------------------------------------------------------------------------------------ safetensors

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_ST_NAMES = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _st_dtype_name(dtype: np.dtype, name: str) -> str:
    dtype = np.dtype(dtype)
    try:
        return _ST_NAMES[dtype.name]
    except KeyError:
        raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors "
                        f"(supported: {sorted(_ST_NAMES)})") from None


def safetensors_dumps(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize ``{name: array}`` (numpy / jax) to safetensors bytes; tensors laid out in name order."""
    header: dict[str, Any] = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata must map str to str, got {bad!r}")
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dt = _st_dtype_name(arr.dtype, name)
        data = np.ascontiguousarray(arr, dtype=_ST_DTYPES[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": [int(s) for s in arr.shape],
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def safetensors_loads(data: bytes, where: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``({name: numpy array}, metadata)``.

    Raises ``ValueError`` naming ``where`` and the defect (truncation, bad header JSON, unknown dtype,
    offsets that do not tile the data section, trailing bytes).
    """
    size = len(data)
    if size < 8:
        raise ValueError(f"{where}: truncated safetensors file: {size} bytes, less than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER or 8 + n > size:
        raise ValueError(f"{where}: corrupt or truncated safetensors file: header length field says {n} bytes "
                         f"but the file has {size} bytes")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: corrupt safetensors header (not valid UTF-8 JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: corrupt safetensors header (__metadata__ is not an object)")
    body = memoryview(data)[8 + n:]
    entries = []
    for name, info in header.items():
        try:
            dt = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * dt.itemsize:
            raise ValueError(f"{where}: tensor {name!r}: shape {list(shape)} of {info['dtype']} needs "
                             f"{math.prod(shape) * dt.itemsize} bytes but its offsets span {end - begin}")
        entries.append((begin, end, name, dt, shape))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            raise ValueError(f"{where}: corrupt safetensors header: tensor {name!r} starts at byte {begin}, "
                             f"expected {pos} (gap or overlap)")
        pos = end
    if pos != len(body):
        what = "truncated" if pos > len(body) else "has trailing bytes"
        raise ValueError(f"{where}: safetensors file {what}: the header describes {pos} data bytes, "
                         f"the file holds {len(body)}")
    arrays = {name: np.frombuffer(body[b:e], dtype=dt).reshape(shape).copy() for b, e, name, dt, shape in entries}
    return arrays, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    return safetensors_loads(data, str(path))


# ------------------------------------------------------------------------------------ atomic files

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_dir(path: str | os.PathLike, files: Mapping[str, bytes], *, overwrite: bool,
                     replaceable: Iterable[str]) -> None:
    """Create directory ``path`` holding exactly ``files``, atomically.

    The files are written and fsynced in a temporary sibling directory that is then renamed to
    ``path``: a reader sees either no directory or a complete one. When ``path`` already exists
    (and ``overwrite``), it must contain nothing but names in ``replaceable`` (so a wrong ``path``
    never wipes unrelated data); it is renamed aside, the new directory renamed in, and the old one
    deleted — between those two renames ``path`` is briefly absent, never partial.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
        allowed = set(replaceable)
        others = sorted(p.name for p in path.iterdir() if p.name not in allowed)
        if others:
            raise FileExistsError(f"{path} exists and holds files this format does not write ({others[:5]}); "
                                  "refusing to replace it")
    tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    old = parent / f".{path.name}.old-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        _fsync_dir(tmp)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ JSON of methods

def _method_registry() -> dict[str, type]:
    from lowrank_jax.methods import DoRA, LoRA, VeRA
    from lowrank_jax.quant.config import NF4
    return {"LoRA": LoRA, "DoRA": DoRA, "VeRA": VeRA, "NF4": NF4, **_EXTRA_CLASSES}


_EXTRA_CLASSES: dict[str, type] = {}


def register_method(cls: type, name: str | None = None) -> type:
    """Allow a custom frozen-dataclass method (or config) class in saved files, under ``name``.

    Saved files record a method as ``{"class": name, "fields": {...}}`` and re-create it with
    ``cls(**fields)`` — only classes registered here (plus LoRA, DoRA, VeRA, NF4) are ever created.
    Usable as a decorator.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_method: {cls!r} is not a dataclass")
    _EXTRA_CLASSES[name or cls.__name__] = cls
    return cls


def _class_name(obj: Any) -> str:
    for name, cls in _method_registry().items():
        if type(obj) is cls:
            return name
    raise TypeError(f"cannot save a {type(obj).__name__} value: not a known method/config class "
                    f"({sorted(_method_registry())}); register it with lowrank_jax.io.register_method")


def value_to_json(v: Any) -> Any:
    """A method field as JSON: tuples → lists, nested dataclasses → ``{"class", "fields"}``."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot save non-finite float {v!r}")
        return v
    if isinstance(v, (tuple, list)):
        return [value_to_json(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return method_to_json(v)
    raise TypeError(f"cannot save a field value of type {type(v).__name__}: {v!r}")


def method_to_json(method: Any) -> dict[str, Any]:
    """``{"class": "LoRA", "fields": {"rank": 8, "alpha": 16.0, "targets": [...], "quant": None, ...}}``."""
    name = _class_name(method)
    return {"class": name,
            "fields": {f.name: value_to_json(getattr(method, f.name)) for f in dataclasses.fields(method)}}


def _value_from_json(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_value_from_json(x) for x in v)
    if isinstance(v, dict):
        return method_from_json(v)
    return v


def method_from_json(d: Any) -> Any:
    """Inverse of :func:`method_to_json` (the class's constructor re-validates every field)."""
    if not isinstance(d, dict) or set(d) != {"class", "fields"} or not isinstance(d["fields"], dict):
        raise ValueError(f"not a method description: {d!r}")
    registry = _method_registry()
    cls = registry.get(d["class"])
    if cls is None:
        raise ValueError(f"unknown method class {d['class']!r} (known: {sorted(registry)}; custom classes "
                         "must be registered with lowrank_jax.io.register_method)")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d["fields"]) - names
    if unknown:
        raise ValueError(f"{d['class']}: unknown fields {sorted(unknown)} (this version has {sorted(names)})")
    try:
        return cls(**{k: _value_from_json(v) for k, v in d["fields"].items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {d['class']} description {d['fields']!r}: {e}") from None


def layout_to_json(layout: Layout) -> dict[str, Any]:
    return {"in_axes": list(layout.in_axes), "out_axes": list(layout.out_axes), "stack": layout.stack}


def layout_from_json(d: Any) -> Layout:
    try:
        return Layout(in_axes=tuple(d["in_axes"]), out_axes=tuple(d["out_axes"]), stack=int(d["stack"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid layout description {d!r}: {e}") from None


# ------------------------------------------------------------------------------------ adapter <-> JSON

FORMAT_VERSION = 1


def _key_parts(path: tuple) -> list[str | int]:
    out: list[str | int] = []
    for k in path:
        if hasattr(k, "key"):
            k = k.key
        elif hasattr(k, "idx"):
            k = k.idx
        else:
            raise TypeError(f"adapter: unsupported container key {k!r}; adapters are nested dicts")
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise TypeError(f"adapter: dict key {k!r} is a {type(k).__name__}; only str and int keys can be saved")
        out.append(k)
    return out


def describe_adapter(adapter: Any, *, with_arrays: bool = True) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """``(nodes, tensors)``: the JSON description of every adapter node and its arrays by tensor name.

    Tensor names are the ``/``-joined node path plus the array name (``enc/layer_0/query/kernel/a``).
    The adapter must be a nested dict (as :func:`lowrank_jax.init` makes) with
    :class:`~lowrank_jax.AdapterParams` leaves.
    """
    import jax

    def walk(tree: Any, prefix: tuple) -> Iterable[tuple[tuple, AdapterParams]]:
        if isinstance(tree, AdapterParams):
            yield prefix, tree
        elif isinstance(tree, dict):
            for k in tree:  # insertion order; JSON keeps it
                yield from walk(tree[k], prefix + (jax.tree_util.DictKey(k),))
        else:
            where = "/".join(str(x) for x in _key_parts(prefix)) or "<root>"
            raise TypeError(f"adapter: {where} is a {type(tree).__name__}; expected nested dicts of AdapterParams")

    nodes: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    for path, node in walk(adapter, ()):
        parts = _key_parts(path)
        base = "/".join(str(p) for p in parts)
        arrays = {}
        for name, value in node.params.items():
            tname = f"{base}/{name}" if base else name
            if tname in tensors:
                raise ValueError(f"adapter: two arrays map to the tensor name {tname!r}")
            arr = np.asarray(value) if with_arrays else value
            tensors[tname] = arr
            arrays[name] = {"tensor": tname, "shape": [int(s) for s in arr.shape], "dtype": np.dtype(arr.dtype).name}
        nodes.append({
            "path": parts,
            "method": method_to_json(node.method),
            "layout": layout_to_json(node.layout),
            "shape": list(node.shape),
            "dtype": node.dtype,
            "shared": node.shared,
            "arrays": arrays,
        })
    if not nodes:
        raise ValueError("adapter: no AdapterParams nodes to save")
    return nodes, tensors


def check_node_arrays(path: str, node: AdapterParams, where: str) -> None:
    """Raise ``ValueError`` when ``node``'s arrays do not have the shapes its method implies."""
    n_in, n_out = node.layout.matrix_shape(node.shape)
    stack = node.layout.stack_shape(node.shape)
    want = {k: stack + tuple(v) for k, v in node.method.param_shapes(n_in, n_out).items()}
    if set(want) != set(node.params):
        raise ValueError(f"{where}: {path}: arrays {sorted(node.params)} do not match "
                         f"{type(node.method).__name__}'s {sorted(want)}")
    for k, v in node.params.items():
        if tuple(v.shape) != want[k]:
            raise ValueError(f"{where}: {path}: array {k!r} has shape {tuple(v.shape)} but a "
                             f"{type(node.method).__name__} on a kernel of shape {node.shape} needs {want[k]}")


def node_from_json(d: Any, where: str) -> tuple[list, AdapterParams | None, dict[str, dict]]:
    """``(path keys, AdapterParams with no arrays yet, array specs)`` from one node description."""
    try:
        parts = list(d["path"])
        method = method_from_json(d["method"])
        layout = layout_from_json(d["layout"])
        shape = tuple(int(s) for s in d["shape"])
        dtype = d["dtype"]
        if not isinstance(dtype, str):
            raise TypeError(f"dtype {dtype!r} is not a string")
        import jax.numpy as jnp
        jnp.dtype(dtype)
        shared = d["shared"]
        arrays = dict(d["arrays"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed node description ({type(e).__name__}: {e}): {str(d)[:300]}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if any(isinstance(p, bool) or not isinstance(p, (str, int)) for p in parts) or not parts:
        raise ValueError(f"{where}: malformed node path {parts!r}")
    if shared is not None and not isinstance(shared, str):
        raise ValueError(f"{where}: malformed shared name {shared!r}")
    try:
        layout.check(shape, "/".join(map(str, parts)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return parts, AdapterParams({}, method, layout, shape, dtype, shared), arrays


def build_adapter(nodes: list[Any], fetch, where: str) -> dict:
    """Re-create the adapter dict from node descriptions; ``fetch(tensor_name, spec)`` returns each array."""
    if not isinstance(nodes, list) or not nodes:
        raise ValueError(f"{where}: the description lists no adapter nodes")
    adapter: dict = {}
    for d in nodes:
        parts, empty, specs = node_from_json(d, where)
        pstr = "/".join(map(str, parts))
        arrays = {}
        for name, spec in specs.items():
            if not isinstance(spec, dict) or "tensor" not in spec:
                raise ValueError(f"{where}: {pstr}: malformed array spec for {name!r}: {spec!r}")
            arrays[name] = fetch(spec["tensor"], spec, pstr, name)
        node = AdapterParams(arrays, empty.method, empty.layout, empty.shape, empty.dtype, empty.shared)
        check_node_arrays(pstr, node, where)
        cur = adapter
        for k in parts[:-1]:
            nxt = cur.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"{where}: node paths overlap at {pstr}")
            cur = nxt
        if parts[-1] in cur:
            raise ValueError(f"{where}: duplicate node path {pstr}")
        cur[parts[-1]] = node
    return adapter


def canonical_sha256(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name
