"""Hugging Face PEFT adapter directories ⇄ lowrank_jax adapters, and merged exports with HF names.

PEFT directory (what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads)::

    adapter_config.json         {"peft_type": "LORA" | "VERA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors   metadata {"format": "pt"}; tensors named
                                "base_model.model.<torch module>.<suffix>"

=========================  ==============  ====================================================
PEFT tensor suffix          torch shape     lowrank_jax (Flax ``(in, out)`` matrix view)
=========================  ==============  ====================================================
``.lora_A.weight``          ``(r, in)``     ``node["a"] (in, r)`` = ``lora_A.weight``ᵀ
``.lora_B.weight``          ``(out, r)``    ``node["b"] (r, out)`` = ``lora_B.weight``ᵀ
``.lora_magnitude_vector``  ``(out,)``      ``node["m"]`` (DoRA, ``use_dora=true``)
``.vera_lambda_d``          ``(r,)``        ``node["lambda_d"]``
``.vera_lambda_b``          ``(out,)``      ``node["lambda_b"]``
``base_model.vera_A``       ``(r, max_in)`` ``frozen[SHARED_KEY]["vera_0"]["a"]`` (same layout)
``base_model.vera_B``       ``(max_out, r)`` ``frozen[SHARED_KEY]["vera_0"]["b"]``
=========================  ==============  ====================================================

Scaling: ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); per-module ``r`` / ``alpha`` come
from ``rank_pattern`` / ``alpha_pattern`` (first key, in order, with
``re.match(rf"(.*\\.)?({key})$", module)``), which this module writes with ``re.escape``d full
module names, so a different rank or alpha per module round-trips exactly.

Names. A *name map* turns a Flax param path into a torch parameter name:
``name_map(path: str) -> str | Sequence[str] | None`` (or a dict ``{path: name}``). The default is
the rule of the reference models: ``a/b/kernel`` → ``a.b.weight`` (and ``scale``/``embedding`` →
``weight``); the torch *module* of an adapted kernel is that name without ``.weight``. A kernel stacked
by ``nn.scan`` (layout ``stack > 0``) is several torch modules: the name map must return one name per
stacked layer (row-major over the stack axes). ``None`` means "no torch counterpart". Built-ins:
:func:`bert_name_map` (``lowrank_jax.models.bert``; ``BertModel`` or ``BertForSequenceClassification``
names, with or without the ``bert/`` nesting of ``BertClassifier``) and :func:`llama_name_map`.

Multi-axis kernels (``DenseGeneral``) are exported through their layout's ``(in, out)`` matrix view: the
equivalent torch module is an ``nn.Linear(prod(in), prod(out))`` fed with the input axes flattened in
layout order.

Not representable in PEFT, so rejected with a ``ValueError``: PiSSA init (PEFT would redo the SVD
on load and mutate the base; export merged weights instead), LoRA and DoRA in one file, several VeRA
configs, per-module dropout/rsLoRA differences; on load also ``lora_bias``, ``modules_to_save`` /
trained biases, embedding LoRA and PiSSA/OLoRA/CorDA/LoftQ-initialised adapters. NF4 (QLoRA) adapters
save as plain LoRA: quantizing the base is the loader's business (bitsandbytes in torch).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.io import _format as fmt
from lowrank_jax.layout import Layout
from lowrank_jax.methods import DoRA, LoRA, VeRA, vera_projections
from lowrank_jax.quant.kernels import is_quantized, kernel_shape_of, layout_of
from lowrank_jax.tree import SHARED_KEY, adapter_nodes, flatten_with_paths, merge, resolve_layout

__all__ = ["save", "load", "merged_export", "default_name_map", "bert_name_map", "llama_name_map",
           "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

NameMap = Callable[[str], "str | Sequence[str] | None"] | Mapping[str, "str | Sequence[str]"]

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


# ------------------------------------------------------------------------------------------- names

def default_name_map(path: str) -> str:
    """``a/b/kernel`` → ``a.b.weight``; ``scale``/``embedding`` → ``weight``; other leaves keep their name."""
    *mods, leaf = path.split("/")
    return ".".join(mods + [_LEAF_TO_TORCH.get(leaf, leaf)])


def bert_name_map(model: str = "BertModel") -> Callable[[str], str | None]:
    """Flax :mod:`lowrank_jax.models.bert` paths → Hugging Face names.

    Args:
      model: ``"BertModel"``: names of ``transformers.BertModel`` (``encoder.layer.0.attention.self.query``);
        a leading ``bert/`` (``BertClassifier``) is dropped and the ``classifier`` head has no counterpart.
        ``"BertForSequenceClassification"``: names under ``bert.`` plus ``classifier.*`` (works for
        both ``BertModel`` and ``BertClassifier`` params).
    """
    from lowrank_jax.models.bert import flax_to_hf_key

    if model not in ("BertModel", "BertForSequenceClassification"):
        raise ValueError(f"bert_name_map: model must be 'BertModel' or 'BertForSequenceClassification', got {model!r}")

    def name(path: str) -> str | None:
        parts = path.split("/")
        if model == "BertModel":
            if parts[0] == "classifier":
                return None
            if parts[0] == "bert":
                parts = parts[1:]
        elif parts[0] not in ("bert", "classifier"):
            parts = ["bert"] + parts
        return flax_to_hf_key(tuple(parts))

    return name


def llama_name_map() -> Callable[[str], str]:
    """Flax :mod:`lowrank_jax.models.llama` paths → ``LlamaForCausalLM`` names
    (``model/layers_0/self_attn/q_proj/kernel`` → ``model.layers.0.self_attn.q_proj.weight``)."""
    from lowrank_jax.models.llama import flax_to_hf_key

    return lambda path: flax_to_hf_key(path)


def _as_callable(name_map: NameMap | None) -> Callable[[str], Any]:
    if name_map is None:
        return default_name_map
    if isinstance(name_map, Mapping):
        return lambda p: name_map.get(p)
    if callable(name_map):
        return name_map
    raise TypeError(f"name_map must be a callable or a dict, got {type(name_map).__name__}")


def _names(fn: Callable[[str], Any], path: str, n: int | None) -> list[str] | None:
    """Torch names for ``path``; ``n`` = number of stacked layers (``None``: accept what comes)."""
    got = fn(path)
    if got is None:
        return None
    names = [got] if isinstance(got, str) else list(got)
    if not all(isinstance(x, str) for x in names):
        raise TypeError(f"name_map({path!r}) returned {got!r}; expected a str or a sequence of str")
    if n is not None and len(names) != n:
        raise ValueError(f"name_map({path!r}) returned {len(names)} name(s) but the kernel is a stack of {n} "
                         f"layer(s); for nn.scan-stacked kernels return one torch name per layer")
    return names


def _module(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's lookup: first key with ``re.match(rf"(.*\\.)?({key})$", module)`` wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _stack_count(node: AdapterParams) -> int:
    return math.prod(node.layout.stack_shape(node.shape))


def _per_layer(x: Any, stack: tuple[int, ...]) -> list[np.ndarray]:
    arr = np.asarray(x)
    return list(arr.reshape((math.prod(stack),) + arr.shape[len(stack):])) if stack else [arr]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# -------------------------------------------------------------------------------------------- save

def save(path: str | os.PathLike, adapter: Any, frozen: Any = None, *, name_map: NameMap | None = None,
         base_model_name_or_path: str | None = None, task_type: str | None = None,
         overwrite: bool = True) -> Path:
    """Write ``adapter`` as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(torch_model, path)`` then reproduces the adapted model, where
    ``torch_model`` is the torch counterpart of the Flax model under ``name_map``.

    Args:
      path: directory to create (atomic: written to a temporary sibling, then renamed).
      adapter: LoRA, DoRA (``use_dora``) or VeRA adapter (one kind per file, as in PEFT).
      frozen: the frozen tree; only used for VeRA, to write its stored shared projections (else they
        are regenerated from the method's seed, which gives the same bits).
      name_map: Flax param path → torch parameter name(s); see the module docstring.
      base_model_name_or_path, task_type: copied into ``adapter_config.json``
        (e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``, ``"FEATURE_EXTRACTION"``, ``"CAUSAL_LM"``).
      overwrite: replace an existing PEFT directory at ``path`` (one holding only PEFT's files).
    """
    fn = _as_callable(name_map)
    nodes = adapter_nodes(adapter)
    if not nodes:
        raise ValueError("peft.save: the adapter has no nodes")
    kinds = {type(n.method) for _, n in nodes}
    modules: list[tuple[str, AdapterParams, list[str]]] = []
    for p, node in nodes:
        names = _names(fn, p, _stack_count(node))
        if names is None:
            raise ValueError(f"peft.save: {p} has no torch name under name_map")
        modules.append((p, node, [_module(n) for n in names]))
    all_modules = [m for _, _, ms in modules for m in ms]
    dup = [m for m, c in Counter(all_modules).items() if c > 1]
    if dup:
        raise ValueError(f"peft.save: several kernels map to the same torch module(s) {dup[:5]}")
    tensors: dict[str, np.ndarray] = {}
    common = {"base_model_name_or_path": base_model_name_or_path, "task_type": task_type,
              "inference_mode": True, "revision": None, "modules_to_save": None, "bias": "none",
              "fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None,
              "target_modules": sorted(all_modules)}
    if kinds <= {LoRA, DoRA}:
        config = _lora_config(modules, tensors, kinds)
    elif kinds == {VeRA}:
        config = _vera_config(modules, tensors, frozen)
    else:
        raise ValueError(f"peft.save: one PEFT file holds one method kind (LoRA, DoRA or VeRA); this adapter "
                         f"mixes {sorted(k.__name__ for k in kinds)} — save each part separately")
    config = {**common, **config}
    blob = fmt.safetensors_dumps(tensors, {"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    path = Path(path)
    fmt.atomic_write_dir(path, {CONFIG_NAME: text, WEIGHTS_NAME: blob}, overwrite=overwrite,
                         replaceable=(CONFIG_NAME, WEIGHTS_NAME, "README.md"))
    return path


def _uniform(values: Sequence[Any], what: str) -> Any:
    distinct = sorted(set(values), key=repr)
    if len(distinct) > 1:
        raise ValueError(f"peft.save: PEFT has one {what} per adapter, these nodes use {distinct}")
    return distinct[0]


def _lora_config(modules, tensors: dict, kinds) -> dict[str, Any]:
    if len(kinds) > 1:
        raise ValueError("peft.save: LoRA and DoRA nodes in one adapter cannot be one PEFT config "
                         "(use_dora is per adapter); save them separately")
    use_dora = kinds == {DoRA}
    methods = [node.method for _, node, _ in modules]
    for p, node, _ in modules:
        if node.method.init == "pissa":
            raise ValueError(f"peft.save: {p} uses PiSSA init: its frozen base is the residual W0 − s·A@B, and "
                             "PEFT would redo the SVD on load; use merged_export, or re-init with another init")
    rslora = _uniform([m.rslora for m in methods], "use_rslora")
    dropout = _uniform([m.dropout for m in methods], "lora_dropout")
    per_module = [(mod, node.method.rank, node.method.alpha) for _, node, mods in modules for mod in mods]
    r_default = Counter(r for _, r, _ in per_module).most_common(1)[0][0]
    a_default = Counter(a for _, _, a in per_module).most_common(1)[0][0]
    # PEFT matches a pattern key against every module *suffix* ("(.*\.)?(key)$"): "^" pins each key to its
    # own full module name, so "enc.fc1" never picks up the rank of a module named "fc1".
    rank_pattern = {"^" + re.escape(mod): r for mod, r, _ in per_module if r != r_default}
    alpha_pattern = {"^" + re.escape(mod): _number(a) for mod, _, a in per_module if a != a_default}
    for mod, r, a in per_module:
        got = (_pattern_value(rank_pattern, mod, r_default), _pattern_value(alpha_pattern, mod, a_default))
        if got != (r, a):  # pragma: no cover - a safety net for the anchoring above
            raise ValueError(f"peft.save: module {mod!r} would read rank/alpha {got} from the patterns, not {(r, a)}")
    for _, node, mods in modules:
        _node_tensors(node, mods, tensors)
    return {"peft_type": "LORA", "r": r_default, "lora_alpha": _number(a_default), "lora_dropout": dropout,
            "use_rslora": rslora, "use_dora": use_dora, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "init_lora_weights": True, "lora_bias": False}


def _vera_config(modules, tensors: dict, frozen: Any) -> dict[str, Any]:
    method = _uniform([node.method for _, node, _ in modules], "VeRA config (rank, seed, d_initial, dropout)")
    shared_names = {node.shared for _, node, _ in modules}
    dims = [node.layout.matrix_shape(node.shape) for _, node, _ in modules]
    max_in, max_out = max(d[0] for d in dims), max(d[1] for d in dims)
    a_sh = b_sh = None
    if frozen is not None and isinstance(frozen, Mapping) and SHARED_KEY in frozen and len(shared_names) == 1:
        sh = frozen[SHARED_KEY].get(next(iter(shared_names)))
        if sh is not None:
            a_sh, b_sh = np.asarray(sh["a"]), np.asarray(sh["b"])
            if a_sh.shape != (method.rank, max_in) or b_sh.shape != (max_out, method.rank):
                raise ValueError(f"peft.save: shared VeRA projections have shapes {a_sh.shape}, {b_sh.shape}; PEFT "
                                 f"expects ({method.rank}, {max_in}) and ({max_out}, {method.rank}) for these targets")
    if a_sh is None:
        a_sh, b_sh = vera_projections(method.rank, max_in, max_out, method.seed)
    for name, arr in (("a", a_sh), ("b", b_sh)):           # PEFT's layout is ours for the projections
        tensors["base_model." + method.shared_arrays[name].peft] = arr
    for _, node, mods in modules:
        _node_tensors(node, mods, tensors)
    return {"peft_type": "VERA", "r": method.rank, "projection_prng_key": method.seed, "save_projection": True,
            "vera_dropout": method.dropout, "d_initial": method.d_initial, "init_weights": True}


def _node_tensors(node: AdapterParams, mods: Sequence[str], tensors: dict) -> None:
    """One node's PEFT tensors, named and laid out from its method's array declaration
    (``<module>.<ArraySpec.peft>``; 2-D arrays transposed to torch's layout), one set per stacked layer."""
    stack = node.layout.stack_shape(node.shape)
    for name, spec in node.method.arrays.items():
        for mod, arr in zip(mods, _per_layer(node[name], stack)):
            tensors[f"{PREFIX}{mod}.{spec.peft}"] = np.ascontiguousarray(arr.T) if arr.ndim == 2 else arr


def _peft_suffixes(*methods: type) -> dict[str, str]:
    """``{".<PEFT tensor suffix>": array name}`` from the methods' array declarations."""
    return {"." + spec.peft: name for cls in methods for name, spec in cls.arrays.items() if spec.peft}


# -------------------------------------------------------------------------------------------- load

_LORA_SUFFIXES = {**_peft_suffixes(LoRA, DoRA), ".lora_magnitude_vector.weight": "m"}   # + PEFT's older spelling
_VERA_SUFFIXES = _peft_suffixes(VeRA)
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


def _read_config(path: Path) -> dict[str, Any]:
    cpath = path / CONFIG_NAME
    if not cpath.exists():
        raise FileNotFoundError(f"{cpath}: missing (not a PEFT adapter directory?)")
    config = fmt.load_json(cpath.read_bytes(), str(cpath))
    if not isinstance(config, dict):
        raise ValueError(f"{cpath}: expected a JSON object")
    return config


def load(path: str | os.PathLike, params: Any, *, name_map: NameMap | None = None,
         layouts: Mapping[str, Layout] | None = None) -> tuple[Any, dict]:
    """Read a PEFT LoRA / DoRA / VeRA adapter directory for the Flax model whose params are ``params``.

    Args:
      path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base model's params (nested dicts), the counterpart of PEFT's base model.
      name_map: Flax param path → torch parameter name(s) (see the module docstring); inverted over
        ``params`` to find the kernel of every PEFT module.
      layouts: layouts of multi-axis / stacked kernels (as for :func:`lowrank_jax.init`).

    Returns:
      ``(frozen, adapter)`` as :func:`lowrank_jax.init` would return them: ``frozen`` is ``params``
      (plus the VeRA projections under ``SHARED_KEY``), ``adapter`` one node per adapted kernel.
      Modules with different ``r``/``alpha`` (``rank_pattern``/``alpha_pattern``) get different
      method values whose ``targets`` are the escaped paths of their kernels.
    """
    path = Path(path)
    config = _read_config(path)
    cname = str(path / CONFIG_NAME)
    wpath = path / WEIGHTS_NAME
    if not wpath.exists():
        raise FileNotFoundError(f"{wpath}: missing")
    tensors, _ = fmt.read_safetensors(wpath)
    peft_type = fmt.json_str(config.get("peft_type"), cname, "peft_type").upper()
    if peft_type not in ("LORA", "VERA"):
        raise ValueError(f"{cname}: peft_type {config.get('peft_type')!r} is not supported (LORA, VERA)")
    if not isinstance(config.get("modules_to_save"), (list, type(None))):
        raise fmt.json_error(cname, "modules_to_save", "a list of module names or null", config["modules_to_save"])
    if config.get("modules_to_save"):
        raise ValueError(f"{cname}: modules_to_save={config['modules_to_save']!r} (fully trained modules) is not "
                         "supported; load those weights into the base params yourself")

    fn = _as_callable(name_map)
    leaves, _ = flatten_with_paths(params, is_leaf=is_quantized)
    by_module: dict[str, tuple[str, int]] = {}
    clashes: dict[str, list[tuple[str, int]]] = {}  # torch modules that several kernels (or layers) map to
    leaf_of: dict[str, Any] = {}
    for p, leaf in leaves:
        if not is_quantized(leaf) and getattr(leaf, "ndim", 0) < 2:
            continue
        names = _names(fn, p, None)
        if names is None:
            continue
        leaf_of[p] = leaf
        for i, n in enumerate(names):
            m = _module(n)
            if m in by_module:
                clashes.setdefault(m, [by_module[m]]).append((p, i))
            else:
                by_module[m] = (p, i)

    # Group tensors by module.
    suffixes = _LORA_SUFFIXES if peft_type == "LORA" else _VERA_SUFFIXES
    per_module: dict[str, dict[str, np.ndarray]] = {}
    shared: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if peft_type == "VERA" and key in ("base_model.vera_A", "base_model.vera_B"):
            shared[key[-1]] = value
            continue
        hit = next(((s, k) for s, k in suffixes.items() if key.endswith(s)), None)
        if hit is None or not key.startswith(PREFIX):
            raise ValueError(f"{wpath}: tensor {key!r} is not supported by lowrank_jax ({peft_type}: expected "
                             f"'{PREFIX}<module>' + one of {sorted(suffixes)}; biases, embeddings and "
                             "modules_to_save cannot be loaded)")
        module = key[len(PREFIX):-len(hit[0])]
        if hit[1] in per_module.get(module, {}):
            raise ValueError(f"{wpath}: module {module!r} has two {hit[1]!r} tensors (e.g. "
                             f"'.lora_magnitude_vector' and '.lora_magnitude_vector.weight'); which one is meant "
                             "is ambiguous")
        per_module.setdefault(module, {})[hit[1]] = value
    if not per_module:
        raise ValueError(f"{wpath}: holds no adapter tensors")

    # Modules → kernels.
    grouped: dict[str, dict[int, tuple[str, dict[str, np.ndarray]]]] = {}
    for module, arrays in per_module.items():
        if module not in by_module:
            near = [m for m in by_module if m.rsplit(".", 1)[-1] == module.rsplit(".", 1)[-1]][:5]
            raise ValueError(f"{wpath}: PEFT module {module!r} has no kernel in params under this name_map"
                             + (f" (mapped modules with that name: {near})" if near else ""))
        if module in clashes:
            who = ", ".join(f"{q}" + (f" (layer {j})" if j else "") for q, j in clashes[module])
            raise ValueError(f"{wpath}: PEFT module {module!r} is ambiguous: under this name_map it is the torch "
                             f"module of {who}; make name_map give each kernel its own module name")
        p, i = by_module[module]
        grouped.setdefault(p, {})[i] = (module, arrays)

    if peft_type == "LORA":
        adapter_items = _load_lora(config, cname, wpath, grouped, leaf_of, layouts)
        frozen = params
    else:
        adapter_items, frozen = _load_vera(config, cname, wpath, grouped, leaf_of, layouts, shared, params)

    from lowrank_jax.paths import key_value, path_str
    key_paths = {path_str(kp): [key_value(k) for k in kp]
                 for kp, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]}
    adapter: dict = {}
    for p, node in adapter_items:
        cur = adapter
        keys = key_paths[p]
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = node
    return frozen, adapter


def _target_geometry(p: str, leaf: Any, layouts: Any) -> tuple[tuple[int, ...], Layout, tuple[int, ...], int, int]:
    """``(shape, layout, stack, n_in, n_out)`` of the kernel at ``p`` as the adapter sees it (an NF4
    kernel carries its own layout)."""
    if is_quantized(leaf):
        shape, layout = kernel_shape_of(leaf), layout_of(leaf)
    else:
        shape = tuple(leaf.shape)
        layout = resolve_layout(p, shape, layouts)
    n_in, n_out = layout.matrix_shape(shape)
    return shape, layout, layout.stack_shape(shape), n_in, n_out


def _layer_arrays(p: str, entries: dict, n: int, wpath: Path) -> list[tuple[str, dict]]:
    missing = [i for i in range(n) if i not in entries]
    if missing:
        raise ValueError(f"{wpath}: {p} is a stack of {n} layers but PEFT has adapters for only "
                         f"{sorted(entries)} of them")
    return [entries[i] for i in range(n)]


def _cfg(config: Mapping[str, Any], cname: str, key: str, default: Any, check: Callable[..., Any], **kw) -> Any:
    """``config[key]`` (``default`` when absent or null), type- and range-checked by a ``fmt.json_*`` check."""
    v = config.get(key)
    return default if v is None else check(v, cname, key, **kw)


def _cfg_patterns(config: Mapping[str, Any], cname: str, key: str, check: Callable[..., Any], **kw) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: an object of valid regexes to checked values."""
    pattern = config.get(key)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise fmt.json_error(cname, key, "an object {module regex: value}", pattern)
    for k, v in pattern.items():
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise ValueError(f"{cname}: {key} key {k!r} is not a valid regular expression ({e})") from None
        check(v, cname, f"{key}[{k!r}]", **kw)
    return pattern


def _float_tensor(x: np.ndarray, wpath: Path, module: str, what: str) -> np.ndarray:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{wpath}: module {module!r}: {what} is {x.dtype}, expected a floating-point tensor")
    return x.astype(np.float32)


def _load_lora(config, cname, wpath, grouped, leaf_of, layouts) -> list[tuple[str, AdapterParams]]:
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise fmt.json_error(cname, "init_lora_weights", "true, false or an init name", init)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise ValueError(f"{cname}: init_lora_weights={init!r} changes the base weights in PEFT; convert the "
                         "adapter first (save_pretrained(path_initial_model_for_weight_conversion=...))")
    if _cfg(config, cname, "lora_bias", False, fmt.json_bool):
        raise ValueError(f"{cname}: lora_bias=true is not supported")
    use_dora = _cfg(config, cname, "use_dora", False, fmt.json_bool)
    rslora = _cfg(config, cname, "use_rslora", False, fmt.json_bool)
    dropout = _cfg(config, cname, "lora_dropout", 0.0, fmt.json_number, below_one=True)
    r_default = _cfg(config, cname, "r", 8, fmt.json_int, lo=1)
    a_default = _cfg(config, cname, "lora_alpha", 8.0, fmt.json_number, positive=True)
    rank_pattern = _cfg_patterns(config, cname, "rank_pattern", fmt.json_int, lo=1)
    alpha_pattern = _cfg_patterns(config, cname, "alpha_pattern", fmt.json_number, positive=True)

    specs = []  # (path, layout, shape, dtype, rank, alpha, a, b, m)
    for p, entries in grouped.items():
        leaf = leaf_of[p]
        shape, layout, stack, n_in, n_out = _target_geometry(p, leaf, layouts)
        layers = _layer_arrays(p, entries, math.prod(stack), wpath)
        a_l, b_l, m_l, ranks, alphas = [], [], [], set(), set()
        for module, arrays in layers:
            need = set((DoRA if use_dora else LoRA).arrays)
            if set(arrays) != need:
                raise ValueError(f"{wpath}: module {module!r} has tensors {sorted(arrays)}, expected "
                                 f"{sorted(need)} for {'DoRA' if use_dora else 'LoRA'}")
            A, B = arrays["a"], arrays["b"]
            r = A.shape[0] if A.ndim else 0
            if r < 1 or A.shape != (r, n_in) or B.shape != (n_out, r):
                raise ValueError(f"{wpath}: module {module!r}: lora_A {A.shape} / lora_B {B.shape} do not fit {p} "
                                 f"(kernel {shape}, (in, out) = ({n_in}, {n_out})); expected ({r}, {n_in}) / "
                                 f"({n_out}, {r})")
            r_cfg = int(_pattern_value(rank_pattern, module, r_default))
            if r_cfg != r:
                raise ValueError(f"{wpath}: module {module!r} has rank {r} but {CONFIG_NAME} implies {r_cfg}")
            if use_dora and arrays["m"].shape != (n_out,):
                raise ValueError(f"{wpath}: module {module!r}: lora_magnitude_vector has shape "
                                 f"{arrays['m'].shape}, {p} needs ({n_out},)")
            ranks.add(r)
            alphas.add(float(_pattern_value(alpha_pattern, module, a_default)))
            a_l.append(_float_tensor(A, wpath, module, "lora_A").T)
            b_l.append(_float_tensor(B, wpath, module, "lora_B").T)
            if use_dora:
                m_l.append(_float_tensor(arrays["m"], wpath, module, "lora_magnitude_vector"))
        if len(ranks) > 1 or len(alphas) > 1:
            raise ValueError(f"{wpath}: the layers of the stacked kernel {p} have different ranks/alphas "
                             f"{sorted(ranks)}/{sorted(alphas)}; one stacked kernel needs one method")

        def stacked(xs):
            return np.stack(xs).reshape(stack + xs[0].shape) if stack else xs[0]

        arrays = {"a": stacked(a_l), "b": stacked(b_l)}
        if use_dora:
            arrays["m"] = stacked(m_l)
        specs.append((p, layout, shape, str(leaf.dtype), ranks.pop(), alphas.pop(), arrays))

    groups: dict[tuple[int, float], list[str]] = {}
    for p, _, _, _, r, a, _ in specs:
        groups.setdefault((r, a), []).append(p)
    cls = DoRA if use_dora else LoRA
    methods = {key: cls(rank=key[0], alpha=key[1], rslora=rslora, dropout=dropout,
                        targets=tuple(re.escape(p) for p in sorted(ps))) for key, ps in groups.items()}
    return [(p, AdapterParams({k: jnp.asarray(v) for k, v in arrays.items()}, methods[(r, a)], layout, shape, dtype))
            for p, layout, shape, dtype, r, a, arrays in specs]


# Regenerated VeRA projections may take at most this multiple of (adapter file + model params) bytes.
VERA_PROJECTION_BUDGET = 64


def _nbytes(tree: Any) -> int:
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree))


def _load_vera(config, cname, wpath, grouped, leaf_of, layouts, shared, params):
    r = _cfg(config, cname, "r", 256, fmt.json_int, lo=1)
    seed = _cfg(config, cname, "projection_prng_key", 0, fmt.json_int, lo=0, hi=2**32 - 1)
    _cfg(config, cname, "save_projection", True, fmt.json_bool)
    method = VeRA(rank=r, seed=seed, d_initial=_cfg(config, cname, "d_initial", 0.1, fmt.json_number),
                  dropout=_cfg(config, cname, "vera_dropout", 0.0, fmt.json_number, below_one=True),
                  targets=tuple(re.escape(p) for p in sorted(grouped)))
    specs = []
    max_in = max_out = 0
    for p, entries in grouped.items():
        leaf = leaf_of[p]
        shape, layout, stack, n_in, n_out = _target_geometry(p, leaf, layouts)
        max_in, max_out = max(max_in, n_in), max(max_out, n_out)
        ds, bs = [], []
        for module, arrays in _layer_arrays(p, entries, math.prod(stack), wpath):
            if set(arrays) != {"lambda_d", "lambda_b"}:
                raise ValueError(f"{wpath}: module {module!r} has tensors {sorted(arrays)}, expected "
                                 "vera_lambda_d and vera_lambda_b")
            if arrays["lambda_d"].shape != (r,) or arrays["lambda_b"].shape != (n_out,):
                raise ValueError(f"{wpath}: module {module!r}: vera_lambda_d {arrays['lambda_d'].shape} / "
                                 f"vera_lambda_b {arrays['lambda_b'].shape}; {p} needs ({r},) / ({n_out},)")
            ds.append(_float_tensor(arrays["lambda_d"], wpath, module, "vera_lambda_d"))
            bs.append(_float_tensor(arrays["lambda_b"], wpath, module, "vera_lambda_b"))
        arrays = {"lambda_d": np.stack(ds).reshape(stack + (r,)) if stack else ds[0],
                  "lambda_b": np.stack(bs).reshape(stack + (n_out,)) if stack else bs[0]}
        specs.append((p, layout, shape, str(leaf.dtype), arrays))
    if shared:
        if set(shared) != {"A", "B"}:
            raise ValueError(f"{wpath}: has only one of base_model.vera_A / vera_B")
        a_sh = _float_tensor(shared["A"], wpath, "base_model", "vera_A")
        b_sh = _float_tensor(shared["B"], wpath, "base_model", "vera_B")
        if a_sh.ndim != 2 or b_sh.ndim != 2 or a_sh.shape[0] != r or b_sh.shape[1] != r \
                or a_sh.shape[1] < max_in or b_sh.shape[0] < max_out:
            raise ValueError(f"{wpath}: vera_A {a_sh.shape} / vera_B {b_sh.shape} do not cover rank {r} and the "
                             f"targets' max (in, out) = ({max_in}, {max_out})")
        a_sh, b_sh = a_sh[:, :max_in], b_sh[:max_out]
    else:
        need = 4 * r * (max_in + max_out)
        budget = VERA_PROJECTION_BUDGET * (wpath.stat().st_size + _nbytes(params))
        if need > budget:
            raise ValueError(
                f"{cname}: r={r} without saved projections needs vera_A ({r}, {max_in}) and vera_B ({max_out}, {r}): "
                f"{need / 2**20:.1f} MiB of float32, more than {VERA_PROJECTION_BUDGET}x the adapter file plus the "
                f"model params ({budget / 2**20:.1f} MiB); refusing to allocate it. If the rank is right, save the "
                "adapter with save_projection=True")
        a_sh, b_sh = vera_projections(r, max_in, max_out, seed)
    name = "vera_0"
    if not isinstance(params, Mapping):
        raise TypeError("peft.load: VeRA needs params to be a mapping at the top level")
    frozen = {**params, SHARED_KEY: {name: {"a": jnp.asarray(a_sh), "b": jnp.asarray(b_sh)}}}
    items = [(p, AdapterParams({k: jnp.asarray(v) for k, v in arrays.items()}, method, layout, shape, dtype, name))
             for p, layout, shape, dtype, arrays in specs]
    return items, frozen


# ---------------------------------------------------------------------------------- merged export

def merged_export(path: str | os.PathLike, frozen: Any, adapter: Any, name_map: NameMap | None = None, *,
                  layouts: Mapping[str, Layout] | None = None, config: Mapping[str, Any] | None = None,
                  dtype: Any = None) -> Path:
    """Write the merged weights ``merge(frozen, adapter)`` as a torch-style safetensors file.

    Every param gets its torch name from ``name_map`` (``None`` → skipped); ``kernel`` leaves are
    written as torch ``(out, in)`` weights (the transpose of the layout's ``(in, out)`` matrix view,
    one tensor per layer for stacked kernels). Metadata ``{"format": "pt"}``, as
    ``transformers`` expects.

    Args:
      path: a ``*.safetensors`` file, or a directory that receives ``model.safetensors`` (and
        ``config.json`` when ``config`` is given, so ``AutoModel.from_pretrained(path)`` works).
      frozen, adapter: as from :func:`lowrank_jax.init`; NF4 kernels are exported dequantized.
      name_map: e.g. :func:`bert_name_map` ``()`` or :func:`llama_name_map` ``()``.
      layouts: layouts of non-adapted multi-axis / stacked kernels.
      config: a Hugging Face model config dict to write as ``config.json``.
      dtype: cast every tensor to this dtype (default: keep each param's dtype).

    Returns: the path of the safetensors file.
    """
    fn = _as_callable(name_map)
    merged = merge(frozen, adapter)
    node_layouts = {p: n.layout for p, n in adapter_nodes(adapter)}
    tensors: dict[str, np.ndarray] = {}
    for p, leaf in flatten_with_paths(merged, is_leaf=is_quantized)[0]:
        if is_quantized(leaf):
            raise ValueError(f"merged_export: {p} is NF4-quantized and has no adapter; dequantize it first")
        leaf_name = p.rsplit("/", 1)[-1]
        arr = np.asarray(leaf)
        if leaf_name == "kernel":
            layout = node_layouts.get(p) or resolve_layout(p, arr.shape, layouts)
            stack = layout.stack_shape(arr.shape)
            mats = _per_layer(np.asarray(layout.to_matrix(jnp.asarray(leaf))), stack)
            values = [np.ascontiguousarray(m.T) for m in mats]
        else:
            values = None
        names = _names(fn, p, None)
        if names is None:
            continue
        if values is None:
            if len(names) == 1:
                values = [arr]
            elif arr.ndim and arr.shape[0] == len(names):
                values = list(arr)
            else:
                raise ValueError(f"merged_export: name_map({p!r}) gave {len(names)} names for a param of shape "
                                 f"{arr.shape}")
        if len(values) != len(names):
            raise ValueError(f"merged_export: name_map({p!r}) gave {len(names)} names for {len(values)} tensors")
        for n, v in zip(names, values):
            if n in tensors:
                raise ValueError(f"merged_export: two params map to the torch name {n!r}")
            tensors[n] = v.astype(dtype) if dtype is not None else v
    blob = fmt.safetensors_dumps(tensors, {"format": "pt"})
    path = Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt.atomic_write_bytes(path, blob)
        return path
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        fmt.atomic_write_bytes(path / "config.json", json.dumps(dict(config), indent=2).encode())
    fmt.atomic_write_bytes(path / "model.safetensors", blob)
    return path / "model.safetensors"
