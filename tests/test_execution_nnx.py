"""Factored execution (NNX): equals the merge path (outputs, gradients), leaves the model alone,
works under jit/grad and nnx.scan + nnx.remat, caches correctly, supports NF4 kernels."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lj
from lowrank_jax.execution import nnx as lnx
from conftest import randomize, rel_err

D = 16


class Block(nnx.Module):
    """An MLP block: nnx.Linear + a multi-axis nnx.LinearGeneral (in=D, out=(2, D/2))."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.gen = nnx.LinearGeneral(D, (2, D // 2), rngs=rngs)

    def __call__(self, x):
        return x + nnx.gelu(self.lin(x)) + 0.5 * self.gen(x).reshape(x.shape)


class Stack(nnx.Module):
    """The canonical NNX scan-over-layers: nnx.vmap-created layers, nnx.scan + nnx.remat body."""

    def __init__(self, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(8, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs)])
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=D, decode=False,
                                           rngs=rngs)
        self.ein = nnx.Einsum("btd,dnh->btnh", (D, 2, D // 2), (2, D // 2), rngs=rngs)
        self.ein_out = nnx.Einsum("btnh,nhd->btd", (2, D // 2, D), rngs=rngs)   # 2 in axes, no bias
        self.stack = Stack(2, rngs)
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        x = x + self.attn(x)
        x = x + self.ein_out(nnx.tanh(self.ein(x)))
        return self.head(self.stack(x))


TARGETS = r"(embed|blocks/0/(lin|gen)|attn/(query|key|value|out)|ein|ein_out|stack/layers/(lin|gen))/kernel"

METHODS = {
    "lora": lj.LoRA(rank=2, alpha=4.0, targets=TARGETS),
    "dora": lj.DoRA(rank=2, alpha=4.0, targets=TARGETS, detach_norm=False),
    "dora_detached": lj.DoRA(rank=2, alpha=4.0, targets=TARGETS),
    "vera": lj.VeRA(rank=8, targets=TARGETS),
}


@pytest.fixture(scope="module")
def setup():
    model = Model(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    return model, x, lnx.discover(model), lnx.params_of(model), model(x)




def _merged_call(model, params, x):
    """The merge path: a clone of the model updated with the merged params (works inside grad)."""
    clone = nnx.clone(model)
    state = nnx.state(clone, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(clone, state)
    return clone(x)


def _losses(model, frozen, x):
    """``(factored, merged)`` losses of the adapter with the output as aux; a fixed linear readout
    so gradients compare the layers, not an amplifying square."""
    r = jax.random.normal(jax.random.key(7), (2, 5, 4))

    def factored(ad):
        y = lnx.apply(model, frozen, ad, x)
        return jnp.sum(y * r), y

    def merged(ad):
        y = _merged_call(model, lj.merge(frozen, ad), x)
        return jnp.sum(y * r), y

    return factored, merged


def _assert_trees_close(g_f, g_m, tol=1e-5):
    flat_f = jax.tree_util.tree_flatten_with_path(g_f)[0]
    flat_m = jax.tree_util.tree_flatten_with_path(g_m)[0]
    assert [p for p, _ in flat_f] == [p for p, _ in flat_m]
    for (p, a), (_, b) in zip(flat_f, flat_m):
        assert float(jnp.max(jnp.abs(b))) > 0, jax.tree_util.keystr(p)
        assert rel_err(a, b) < tol, (jax.tree_util.keystr(p), rel_err(a, b))


def _snapshot(model):
    graphdef, state = nnx.split(model)
    return graphdef, [np.asarray(v) for v in jax.tree_util.tree_leaves(state)], \
        {p: type(m) for p, m in nnx.iter_graph(model)}


def test_discover_and_params_of(setup):
    model, x, layouts, params, _ = setup
    paths = {lj.tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert {"blocks/0/lin/kernel", "stack/layers/gen/kernel", "attn/query/kernel"} <= paths
    assert not any(p.endswith("/value") for p in paths)                # no Variable ".value" in paths
    assert isinstance(params["blocks"], dict) and isinstance(params["blocks"][0]["lin"]["kernel"], jax.Array)
    L = lj.Layout
    assert layouts["embed/kernel"] == L()
    assert layouts["blocks/0/gen/kernel"] == L((0,), (1, 2))
    assert layouts["attn/query/kernel"] == L((0,), (1, 2))
    assert layouts["attn/out/kernel"] == L((0, 1), (2,))
    assert layouts["ein/kernel"] == L((0,), (1, 2))
    assert layouts["ein_out/kernel"] == L((0, 1), (2,))
    assert layouts["stack/layers/lin/kernel"] == L((0,), (1,), stack=1)
    assert layouts["stack/layers/gen/kernel"] == L((0,), (1, 2), stack=1)


@pytest.mark.parametrize("name", list(METHODS))
def test_factored_equals_merge_outputs_and_gradients(setup, name):
    model, x, layouts, params, _ = setup
    frozen, adapter = lj.init(METHODS[name], params, jax.random.key(2), layouts=layouts)
    assert len(lj.tree.adapter_nodes(adapter)) == 11
    adapter = randomize(adapter)
    before = _snapshot(model)
    factored, merged = _losses(model, frozen, x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # nothing falls back to merging
        g_f, y_f = jax.jit(jax.grad(factored, has_aux=True))(adapter)
    g_m, y_m = jax.jit(jax.grad(merged, has_aux=True))(adapter)
    assert rel_err(y_f, y_m) < 1e-5
    _assert_trees_close(g_f, g_m)

    # the user's model is untouched: same graphdef (classes, attributes), same variable values
    after = _snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    for a, b in zip(before[1], after[1]):
        np.testing.assert_array_equal(a, b)
    assert not hasattr(model.stack.layers.lin, "kernel__lowrank_a")
    assert type(model.stack.layers.lin) is nnx.Linear


def test_plain_eager_grad_over_the_adapter_of_a_scan_remat_stack(setup):
    """Plain ``jax.grad`` (no jit, no nnx.grad) over the adapter argument only, through nnx.scan +
    nnx.remat of nnx.vmap-created layers — the pattern of flax #4771 — equals the merge path."""
    model, x, layouts, params, _ = setup
    stack = model.stack
    h = jax.random.normal(jax.random.key(4), (2, 5, D))
    frozen, adapter = lj.init(lj.DoRA(rank=2, targets=".*kernel", detach_norm=False), lnx.params_of(stack),
                              jax.random.key(2), layouts=lnx.discover(stack))
    assert adapter["layers"]["lin"]["kernel"].a.shape == (2, D, 2)        # one adapter per layer
    adapter = randomize(adapter)
    r = jax.random.normal(jax.random.key(7), (2, 5, D))
    g_f = jax.grad(lambda ad: jnp.sum(lnx.apply(stack, frozen, ad, h) * r))(adapter)
    g_m = jax.grad(lambda ad: jnp.sum(_merged_call(stack, lj.merge(frozen, ad), h) * r))(adapter)
    _assert_trees_close(g_f, g_m)


@pytest.mark.parametrize("name", ["lora", "dora_detached", "vera"])
def test_fresh_adapter_gives_the_base_output(setup, name):
    model, x, layouts, params, y0 = setup
    frozen, adapter = lj.init(METHODS[name], params, jax.random.key(2), layouts=layouts)
    y1 = lnx.apply(model, frozen, adapter, x)          # eager: op by op, the branch adds exactly 0
    if name == "dora_detached":
        # m / ‖W0‖_col is 1 up to the rounding of two separately reduced norms
        np.testing.assert_allclose(y1, y0, rtol=2e-6, atol=2e-6)
    else:
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))


def test_jit_never_reuses_a_trace_for_another_adapter(setup):
    model, x, layouts, params, y0 = setup
    f_lora, a_lora = lj.init(METHODS["lora"], params, jax.random.key(2), layouts=layouts)
    f_vera, a_vera = lj.init(METHODS["vera"], params, jax.random.key(2), layouts=layouts)
    a_lora, a_vera = randomize(a_lora), randomize(a_vera)
    a_other = randomize(lj.init(lj.LoRA(rank=3, targets=r"stack/.*kernel"), params, jax.random.key(3),
                                 layouts=layouts)[1], seed=5)
    traces = []

    @jax.jit
    def run(frozen, adapter):
        traces.append(1)
        return lnx.apply(model, frozen, adapter, x)

    for frozen, adapter in ((f_lora, a_lora), (f_vera, a_vera), (f_lora, a_other),
                            (f_lora, randomize(a_lora, seed=9))):
        # {} = no adapter: the model's own layers on the merged params (the merge path)
        np.testing.assert_allclose(run(frozen, adapter), run(lj.merge(frozen, adapter), {}),
                                   rtol=1e-5, atol=1e-5)
    assert len(traces) == 4                 # lora, merged, vera, other: the last call reused a trace
    np.testing.assert_allclose(run(params, {}), y0, rtol=1e-6, atol=1e-6)
    assert len(traces) == 4


def test_qlora_nf4_kernels_in_scan_and_plain_layers(setup):
    model, x, layouts, params, _ = setup
    method = lj.DoRA(rank=2, alpha=4.0, targets=r"(embed|attn/query|stack/layers/(lin|gen))/kernel",
                     quant=lj.NF4())
    frozen, adapter = lj.init(method, params, jax.random.key(2), layouts=layouts)
    assert lj.quant.kernels.is_quantized(frozen["stack"]["layers"]["lin"]["kernel"])
    adapter = randomize(adapter)
    factored, merged = _losses(model, frozen, x)
    g_f, y_f = jax.jit(jax.grad(factored, has_aux=True))(adapter)
    g_m, y_m = jax.jit(jax.grad(merged, has_aux=True))(adapter)
    assert rel_err(y_f, y_m) < 1e-5
    _assert_trees_close(g_f, g_m)


def test_dropout_only_on_adapter_branch_and_keyed(setup):
    model, x, layouts, params, y0 = setup
    method = lj.LoRA(rank=2, targets=r"stack/layers/lin/kernel", dropout=0.5)
    frozen, adapter = lj.init(method, params, jax.random.key(2), layouts=layouts)
    run = jax.jit(lambda ad, k: lnx.apply(model, frozen, ad, x, dropout_key=k))
    np.testing.assert_allclose(run(adapter, jax.random.key(3)), y0, rtol=1e-6, atol=1e-6)  # B = 0
    adapter = randomize(adapter)
    y_a, y_a2, y_b = run(adapter, jax.random.key(3)), run(adapter, jax.random.key(3)), run(adapter, jax.random.key(4))
    y_eval = jax.jit(lambda ad: lnx.apply(model, frozen, ad, x))(adapter)
    np.testing.assert_array_equal(np.asarray(y_a), np.asarray(y_a2))
    assert not np.allclose(y_a, y_b) and not np.allclose(y_a, y_eval)
    np.testing.assert_allclose(y_eval, _merged_call(model, lj.merge(frozen, adapter), x), rtol=1e-5, atol=1e-5)


class Custom(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)) / 4)
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return self.lin(x @ self.w[...])


def test_unrecognised_kernel_is_merged_with_a_warning_and_state_updates_can_be_returned():
    model = Custom(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, D))
    params = lnx.params_of(model)
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r"(w|lin/kernel)"), params, jax.random.key(2))
    adapter = randomize(adapter)
    ref = _merged_call(model, lj.merge(frozen, adapter), x)
    with pytest.warns(UserWarning, match=r"merged .*inside the step instead: \['w'\]"):
        y, state = lnx.apply(model, frozen, adapter, x, return_state=True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert int(model.calls[...]) == 0                  # the model is untouched ...
    assert int(state["calls"][...]) == 1               # ... its updated state is returned on request
    nnx.update(model, state)
    assert int(model.calls[...]) == 1
