"""Many adapters, one base: ``lj.stack`` + ``apply(..., adapter_ids=ids)``.

Every check is against an independent reference: each example run *alone* with its own, unstacked
adapter through the ordinary ``lj.apply`` (or NNX ``apply``), and the gradient of each adapter taken
on its own examples only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from conftest import BLOCK_TARGETS, TinyModel, randomize, rel_err
from lowrank_jax.execution import nnx as lnx
from lowrank_jax.methods.stacked import Stacked
from lowrank_jax.stacking import stack, unstack

ATTN = r"(blocks|block_\d+)/attn/(query|value)/kernel"
MLP = r"(blocks|block_\d+)/fc\d/kernel"
IDS = [2, 0, -1, 1, 0, 2]            # 6 examples, K = 3, one on the bare base


@pytest.fixture(scope="module")
def tiny():
    model = TinyModel(scan=True)
    x = jax.random.normal(jax.random.key(0), (len(IDS), 6, 8))
    variables = model.init(jax.random.key(1), x)
    return model, variables["params"], lj.discover(model, variables, x), x


def _drop(adapter, pattern):
    """``adapter`` without the kernels whose path fullmatches ``pattern``."""
    import re
    keep = [(p, n) for p, n in lj.tree.adapter_nodes(adapter) if not re.fullmatch(pattern, p)]
    out: dict = {}
    for p, n in keep:
        lj.tree.set_path(out, p.split("/"), n)
    return out


def _case(name, params, layouts):
    """``(frozen, [adapter_0, adapter_1, adapter_2])`` for one frozen base (trained-looking arrays)."""
    def init(method, seed, base=params):
        return lj.init(method, base, jax.random.key(seed), layouts=layouts)

    if name == "lora_mixed_ranks_and_targets":
        frozen, a0 = init(lj.LoRA(rank=2, alpha=4.0, targets=BLOCK_TARGETS), 3)
        _, a1 = init(lj.LoRA(rank=5, alpha=3.0, targets=ATTN, rslora=True), 4)
        _, a2 = init(lj.LoRA(rank=3, alpha=8.0, targets=MLP + "|head/kernel"), 5)
        ads = [a0, a1, a2]
    elif name == "dora":
        frozen, a0 = init(lj.DoRA(rank=2, alpha=4.0, targets=BLOCK_TARGETS), 3)
        _, a1 = init(lj.DoRA(rank=4, alpha=2.0, targets=ATTN, detach_norm=False), 4)
        _, a2 = init(lj.DoRA(rank=3, alpha=6.0, targets=BLOCK_TARGETS), 5)
        ads = [a0, a1, a2]
    elif name == "vera":
        frozen, a0 = init(lj.VeRA(rank=8, targets=BLOCK_TARGETS), 3)
        ads = [a0, _drop(a0, MLP), _drop(a0, ATTN)]
    elif name == "dvora":
        frozen, a0 = init(lj.DVoRA(rank=8, targets=BLOCK_TARGETS), 3)
        ads = [a0, _drop(a0, MLP), _drop(a0, ATTN)]
    elif name == "mixed_methods":      # LoRA beside DoRA on the attention, VeRA on the MLP
        frozen, a1 = init(lj.VeRA(rank=8, targets=MLP), 4)
        _, a0 = init(lj.LoRA(rank=2, alpha=4.0, targets=ATTN), 3)
        _, a2 = init(lj.DoRA(rank=3, alpha=2.0, targets=ATTN), 5)
        ads = [a0, a1, a2]
    elif name == "qlora_nf4_base":
        base = lj.quantize(params, lj.NF4(block_size=32), layouts=layouts)
        frozen, a0 = init(lj.LoRA(rank=2, alpha=4.0, targets=ATTN), 3, base)
        _, a1 = init(lj.DoRA(rank=4, alpha=4.0, targets=BLOCK_TARGETS), 4, base)
        _, a2 = init(lj.LoRA(rank=3, alpha=4.0, targets=MLP), 5, base)
        ads = [a0, a1, a2]
    else:
        raise KeyError(name)
    return frozen, [randomize(a, seed=10 + k, scale=0.3) for k, a in enumerate(ads)]


CASES = ["lora_mixed_ranks_and_targets", "dora", "vera", "dvora", "mixed_methods", "qlora_nf4_base"]


def _alone(run, frozen, adapters, ids, x):
    """Each example alone with its own unstacked adapter (``{}``: the base)."""
    run = jax.jit(run)
    return jnp.concatenate([run(frozen, adapters[k] if k >= 0 else {}, x[b:b + 1]) for b, k in enumerate(ids)])


def _assert_trees(got, want, tol):
    fg, fw = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (p, a), (_, b) in zip(fg, fw):
        assert float(jnp.max(jnp.abs(b))) > 0, jax.tree_util.keystr(p)
        assert rel_err(a, b) < tol, (jax.tree_util.keystr(p), rel_err(a, b))


def _assert_equal_trees(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------- the stack itself

def test_stack_pads_ranks_and_unstack_is_bitwise(tiny):
    model, params, layouts, x = tiny
    frozen, ads = _case("lora_mixed_ranks_and_targets", params, layouts)
    st = stack(ads)
    q = st["blocks"]["attn"]["query"]["kernel"]
    assert isinstance(q.method, Stacked) and q.method.k == 3 and q.method.rank == 5
    assert q.a.shape == (2, 3, 32, 5) and q.b.shape == (2, 3, 5, 32)      # (layers, K, in, R) / (layers, K, R, out)
    assert q.method.methods[2] is None                                   # adapter 2 does not target the query
    np.testing.assert_array_equal(np.asarray(q.a[:, 0, :, 2:]), 0)     # rank 2 padded with exact zeros
    np.testing.assert_array_equal(np.asarray(q.a[:, 2]), 0)
    for got, want in zip(unstack(st), ads):
        _assert_equal_trees(got, want)
    wide = stack(ads, rank=8)
    assert wide["blocks"]["attn"]["query"]["kernel"].a.shape[-1] == 8
    for got, want in zip(unstack(wide), ads):
        _assert_equal_trees(got, want)
    assert lj.count_params(st) == sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(st))


# ------------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("name", CASES)
def test_linen_per_example_outputs_equal_each_example_alone(name, tiny):
    model, params, layouts, x = tiny
    frozen, ads = _case(name, params, layouts)
    st = stack(ads)
    y = jax.jit(lambda s, i: lj.apply(model, {"params": frozen}, s, x, adapter_ids=i))(st, jnp.array(IDS))
    want = _alone(lambda f, a, xb: lj.apply(model, {"params": f}, a, xb), frozen, ads, IDS, x)
    assert rel_err(y, want) < 1e-5
    # the examples really differ by adapter (and the base row is the base)
    base = model.apply({"params": lj.merge(frozen, {})}, x)
    np.testing.assert_allclose(np.asarray(y[2]), np.asarray(base[2]), rtol=1e-5, atol=1e-6)
    assert all(rel_err(y[b], base[b]) > 1e-3 for b, k in enumerate(IDS) if k >= 0)


def test_unrolled_model_and_all_on_one_adapter(tiny):
    _, params, _, x = tiny
    model = TinyModel(scan=False)
    variables = model.init(jax.random.key(1), x)
    layouts = lj.discover(model, variables, x)
    frozen, ads = _case("dora", variables["params"], layouts)
    st = stack(ads)
    for ids in ([1] * len(IDS), [-1] * len(IDS)):
        y = lj.apply(model, {"params": frozen}, st, x, adapter_ids=jnp.array(ids))
        want = lj.apply(model, {"params": frozen}, ads[ids[0]] if ids[0] >= 0 else {}, x)
        assert rel_err(y, want) < 1e-5


# ------------------------------------------------------------------------------- gradients, training

def _loss_weights(y):
    return jax.random.normal(jax.random.key(9), y.shape)


@pytest.mark.parametrize("name", CASES)
def test_gradients_equal_each_adapter_on_its_own_examples(name, tiny):
    model, params, layouts, x = tiny
    frozen, ads = _case(name, params, layouts)
    st = stack(ads)
    r = _loss_weights(model.apply({"params": lj.merge(frozen, {})}, x))
    ids = jnp.array(IDS)

    def stacked_loss(s):
        return jnp.sum(lj.apply(model, {"params": frozen}, s, x, adapter_ids=ids) * r)

    g = jax.jit(jax.grad(stacked_loss))(st)
    for k, ad in enumerate(ads):
        sel = np.array([b for b, i in enumerate(IDS) if i == k])
        g_ref = jax.jit(jax.grad(lambda a: jnp.sum(lj.apply(model, {"params": frozen}, a, x[sel]) * r[sel])))(ad)
        _assert_trees(unstack(g)[k], g_ref, 1e-5 if "dora" not in name else 2e-5)
    # padded ranks, empty slots, a LoRA slot's magnitude beside DoRA: exactly zero gradient
    _assert_equal_trees(stack(unstack(g)), g)


def test_training_k_adapters_at_once_equals_k_separate_runs(tiny):
    model, params, layouts, x = tiny
    frozen, ads = _case("mixed_methods", params, layouts)
    y_shape = model.apply({"params": lj.merge(frozen, {})}, x).shape
    targets = jax.random.normal(jax.random.key(5), y_shape)

    def loss_fn(run, batch):          # a sum over examples: each adapter's loss is its examples' sum
        kw = {"adapter_ids": batch["ids"]} if "ids" in batch else {}
        return jnp.sum((run(batch["x"], **kw) - batch["t"]) ** 2)

    tx = optax.adamw(3e-2, weight_decay=0.01)
    ts = lj.train.make_train_step(model, loss_fn, tx, donate=False)
    st = stack(ads)
    opt = ts.init(st)
    for _ in range(3):
        st, opt, _ = ts.step(st, opt, frozen, {"x": x, "t": targets, "ids": jnp.array(IDS)})
    for k, ad in enumerate(ads):
        sel = np.array([b for b, i in enumerate(IDS) if i == k])
        o = ts.init(ad)
        for _ in range(3):
            ad, o, _ = ts.step(ad, o, frozen, {"x": x[sel], "t": targets[sel]})
        _assert_trees(unstack(st)[k], ad, 1e-5)


# ------------------------------------------------------------------------------- NNX

@pytest.fixture(scope="module")
def nnx_setup():
    from test_contract import NNXModel
    from flax import nnx
    model = NNXModel(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (len(IDS), 5, 8))
    return model, lnx.params_of(model), lnx.discover(model), x


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_nnx_outputs_and_gradients_equal_each_example_alone(name, nnx_setup):
    model, params, layouts, x = nnx_setup
    make = {"lora": lambda r, t, **kw: lj.LoRA(rank=r, alpha=4.0, targets=t, **kw),
            "dora": lambda r, t, **kw: lj.DoRA(rank=r, alpha=4.0, targets=t, **kw)}
    if name == "vera":
        frozen, a0 = lj.init(lj.VeRA(rank=8, targets=r".*kernel"), params, jax.random.key(3), layouts=layouts)
        ads = [a0, _drop(a0, r"stack/.*"), _drop(a0, r"(lin|head)/kernel")]
    else:
        frozen, a0 = lj.init(make[name](2, r".*kernel"), params, jax.random.key(3), layouts=layouts)
        _, a1 = lj.init(make[name](4, r"stack/.*kernel", rslora=True), params, jax.random.key(4), layouts=layouts)
        _, a2 = lj.init(make[name](3, r"(lin|head|stack/layers/gen)/kernel"), params, jax.random.key(5),
                        layouts=layouts)
        ads = [a0, a1, a2]
    ads = [randomize(a, seed=20 + k, scale=0.3) for k, a in enumerate(ads)]
    st = stack(ads)
    ids = jnp.array(IDS)
    r = jax.random.normal(jax.random.key(9), (len(IDS), 5, 4))

    def loss(s):
        y = lnx.apply(model, frozen, s, x, adapter_ids=ids)
        return jnp.sum(y * r), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(st)
    want = _alone(lambda f, a, xb: lnx.apply(model, f, a, xb), frozen, ads, IDS, x)
    assert rel_err(y, want) < 1e-5
    for k, ad in enumerate(ads):
        sel = np.array([b for b, i in enumerate(IDS) if i == k])
        g_ref = jax.jit(jax.grad(lambda a: jnp.sum(lnx.apply(model, frozen, a, x[sel]) * r[sel])))(ad)
        _assert_trees(unstack(g)[k], g_ref, 1e-5 if name != "dora" else 2e-5)


# ------------------------------------------------------------------------------- hot-swap

def test_hot_swap_100_times_never_recompiles(tiny):
    model, params, layouts, x = tiny
    method = lj.LoRA(rank=4, alpha=8.0, targets=BLOCK_TARGETS)
    frozen, _ = lj.init(method, params, jax.random.key(0), layouts=layouts)
    pool = [randomize(lj.init(method, params, jax.random.key(s), layouts=layouts)[1], seed=s) for s in range(6)]
    traces = []

    @jax.jit
    def serve(stacked, xb, ids):
        traces.append(1)
        return lj.apply(model, {"params": frozen}, stacked, xb, adapter_ids=ids)

    rng = np.random.default_rng(0)
    ids = jnp.array([0, 1, 2, 3, -1, 1])
    for i in range(100):
        chosen = rng.choice(len(pool), size=4, replace=False)
        y = serve(stack([pool[c] for c in chosen]), x, ids)
        if i == 99:
            b = 3
            want = lj.apply(model, {"params": frozen}, pool[chosen[3]], x[b:b + 1])
            assert rel_err(y[b:b + 1], want) < 1e-5
    assert len(traces) == 1
    assert serve._cache_size() == 1


# ------------------------------------------------------------------------------- generation

def test_llama_generation_each_sequence_with_its_own_adapter():
    from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM, greedy_generate

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    prompts = jax.random.randint(jax.random.key(0), (4, 5), 0, cfg.vocab_size)
    params = model.init(jax.random.key(1), prompts)["params"]
    qv, mlp = r".*/(q_proj|v_proj)/kernel", r".*/mlp/.*/kernel"
    frozen, a0 = lj.init(lj.LoRA(rank=4, alpha=8.0, targets=qv), params, jax.random.key(2))
    _, a1 = lj.init(lj.LoRA(rank=2, alpha=4.0, targets=mlp), params, jax.random.key(3))
    _, a2 = lj.init(lj.DoRA(rank=4, alpha=8.0, targets=r".*/(o_proj|q_proj)/kernel"), params, jax.random.key(4))
    ads = [randomize(a, seed=30 + k, scale=1.0) for k, a in enumerate([a0, a1, a2])]
    ids = [1, -1, 0, 2]
    out = greedy_generate(model, frozen, prompts, 6, adapter=stack(ads), adapter_ids=ids)
    alone = [greedy_generate(model, frozen, prompts[b:b + 1], 6, adapter=ads[k]) if k >= 0 else
             greedy_generate(model, lj.base_params(frozen), prompts[b:b + 1], 6) for b, k in enumerate(ids)]
    np.testing.assert_array_equal(out, np.concatenate(alone))
    # each adapter changes the continuation of the same prompt
    same = jnp.tile(prompts[:1], (4, 1))
    out_same = greedy_generate(model, frozen, same, 6, adapter=stack(ads), adapter_ids=[0, 1, 2, -1])
    assert len({tuple(row[5:]) for row in out_same.tolist()}) >= 3


# ------------------------------------------------------------------------------- dropout, errors

def test_equal_dropout_rates_give_the_unstacked_mask(tiny):
    model, params, layouts, x = tiny
    method = lj.LoRA(rank=2, alpha=4.0, targets=BLOCK_TARGETS, dropout=0.3)
    frozen, a0 = lj.init(method, params, jax.random.key(0), layouts=layouts)
    a0 = randomize(a0)
    key = jax.random.key(7)
    y = lj.apply(model, {"params": frozen}, stack([a0, a0]), x, adapter_ids=jnp.zeros(len(IDS), int),
                 dropout_key=key)
    want = lj.apply(model, {"params": frozen}, a0, x, dropout_key=key)
    assert rel_err(y, want) < 1e-5
    assert rel_err(want, lj.apply(model, {"params": frozen}, a0, x)) > 1e-4


def test_errors_are_clear(tiny):
    model, params, layouts, x = tiny
    frozen, ads = _case("lora_mixed_ranks_and_targets", params, layouts)
    st = stack(ads)
    with pytest.raises(TypeError, match="cannot be merged into one kernel"):
        lj.merge(frozen, st)
    with pytest.raises(ValueError, match="pass adapter_ids"):
        lj.apply(model, {"params": frozen}, st, x)
    with pytest.raises(ValueError, match="adapter_ids go with a stacked adapter"):
        lj.apply(model, {"params": frozen}, ads[0], x, adapter_ids=jnp.array(IDS))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 3\)"):
        lj.apply(model, {"params": frozen}, st, x, adapter_ids=jnp.array([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"blocks/attn/\w+/kernel: adapter_ids has 4 entries .* leading axis 6"):
        lj.apply(model, {"params": frozen}, st, x, adapter_ids=jnp.array([0, 1, 2, 0]))
    _, pissa = lj.init(lj.LoRA(rank=2, targets=ATTN, init="pissa"), params, jax.random.key(0), layouts=layouts)
    with pytest.raises(ValueError, match="PiSSA"):
        stack([ads[0], pissa])
    _, vera = lj.init(lj.VeRA(rank=8, targets=ATTN), params, jax.random.key(0), layouts=layouts)
    with pytest.raises(TypeError, match="all be LoRA/DoRA or all"):
        stack([ads[0], vera])
    with pytest.raises(ValueError, match="below the rank 5"):
        stack(ads, rank=4)
    with pytest.raises(TypeError, match="already stacked"):
        stack([st])
