"""Factored execution (linen): equals the merge path, never forms W0+ΔW, caches correctly."""

import dataclasses
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from conftest import BLOCK_TARGETS, TinyModel, randomize, rel_err

METHODS = {
    "lora": lj.LoRA(rank=4, alpha=8.0, targets=BLOCK_TARGETS),
    "dora": lj.DoRA(rank=4, alpha=8.0, targets=BLOCK_TARGETS, detach_norm=False),
    "dora_detached": lj.DoRA(rank=4, alpha=8.0, targets=BLOCK_TARGETS),
    "vera": lj.VeRA(rank=16, targets=BLOCK_TARGETS),
}




@pytest.mark.parametrize("name", list(METHODS))
def test_factored_equals_merge_outputs_and_gradients(tiny, name):
    model, variables, x = tiny
    layouts = lj.discover(model, variables, x)
    frozen, adapter = lj.init(METHODS[name], variables["params"], jax.random.key(2), layouts=layouts)
    adapter = randomize(adapter)

    def merged_loss(ad):
        return jnp.sum(model.apply({"params": lj.merge(frozen, ad)}, x) ** 2)

    def factored_loss(ad):
        return jnp.sum(lj.apply(model, {"params": frozen}, ad, x) ** 2)

    y_m = model.apply({"params": lj.merge(frozen, adapter)}, x)
    y_f = jax.jit(lambda ad: lj.apply(model, {"params": frozen}, ad, x))(adapter)
    assert rel_err(y_f, y_m) < 1e-5
    g_m = jax.grad(merged_loss)(adapter)
    g_f = jax.jit(jax.grad(factored_loss))(adapter)
    for a, b in zip(jax.tree_util.tree_leaves(g_f), jax.tree_util.tree_leaves(g_m)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("name", ["lora", "dora_detached", "vera"])
def test_fresh_adapter_output_equals_base_model_bitwise(tiny, name):
    model, variables, x = tiny
    frozen, adapter = lj.init(METHODS[name], variables["params"], jax.random.key(2),
                              layouts=lj.discover(model, variables, x))
    # Op by op, the base path is the layer's own computation and the fresh branch adds exactly 0.
    y0 = model.apply(variables, x)
    y1 = lj.apply(model, {"params": frozen}, adapter, x)
    if name == "dora_detached":
        # m / ‖W0‖_col is 1 up to the rounding of two separately reduced norms
        np.testing.assert_allclose(y1, y0, rtol=2e-6, atol=2e-6)
    else:
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    # Compiled, XLA may fuse the two programs differently; they still agree to float32 rounding.
    y0j = jax.jit(lambda: model.apply(variables, x))()
    y1j = jax.jit(lambda ad: lj.apply(model, {"params": frozen}, ad, x))(adapter)
    np.testing.assert_allclose(y1j, y0j, rtol=2e-6, atol=2e-6)


class EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((8, 2, 4), "btd,dnh->btnh", name="q")(x)          # in = d, out = (n, h)
        o = nn.Einsum((2, 4, 8), "btnh,nhd->btd", name="o", use_bias=False)(q)
        return o


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_einsum_layers(name):
    model = EinsumModel()
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    variables = model.init(jax.random.key(1), x)
    layouts = lj.discover(model, variables, x)
    assert layouts["q/kernel"] == lj.Layout((0,), (1, 2)) and layouts["o/kernel"] == lj.Layout((0, 1), (2,))
    method = {"lora": lj.LoRA(rank=2, targets=".*kernel"), "dora": lj.DoRA(rank=2, targets=".*kernel"),
              "vera": lj.VeRA(rank=4, targets=".*kernel")}[name]
    frozen, adapter = lj.init(method, variables["params"], jax.random.key(2), layouts=layouts)
    adapter = randomize(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: both einsums are factored
        y_f = lj.apply(model, {"params": frozen}, adapter, x)
    y_m = model.apply({"params": lj.merge(frozen, adapter)}, x)
    assert rel_err(y_f, y_m) < 1e-5


def _dot_shapes(hlo_text):
    return [tuple(int(d) for d in m.group(1).split(",") if d)
            for m in re.finditer(r"= f32\[([\d,]*)\][^\n]*? dot\(", hlo_text)]


@pytest.mark.parametrize("name", ["lora", "dora_detached", "vera"])
def test_train_step_hlo_has_no_full_size_dot(name):
    model = TinyModel(dim=48, layers=2, scan=False)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    variables = model.init(jax.random.key(1), x)
    layouts = lj.discover(model, variables, x)
    frozen, adapter = lj.init(METHODS[name], variables["params"], jax.random.key(2), layouts=layouts)
    tx = optax.adam(1e-3)
    ts = lj.train.make_train_step(model, lambda run, b: jnp.mean(run(b) ** 2), tx, donate=False)
    hlo = ts.step.lower(adapter, ts.init(adapter), frozen, x).compile().as_text()
    full = {tuple(layouts[p].matrix_shape(v.shape)) for p, v in
            [(p, n) for p, n in lj.tree.adapter_nodes(adapter)]}
    full |= {(o, i) for i, o in full}
    dots = _dot_shapes(hlo)
    assert dots, "expected dots in the compiled step"
    assert not [d for d in dots if d[-2:] in full], f"full-size dot in the step: {full & set(d[-2:] for d in dots)}"
    # the check can fail: the merge-path step does form full-size dW
    ts_merge = lj.train.make_train_step(model, lambda run, b: jnp.mean(run(b) ** 2), tx, factored=False, donate=False)
    hlo_m = ts_merge.step.lower(adapter, ts_merge.init(adapter), frozen, x).compile().as_text()
    assert [d for d in _dot_shapes(hlo_m) if d[-2:] in full]


def test_jit_never_reuses_a_trace_for_another_adapter(tiny):
    model, variables, x = tiny
    layouts = lj.discover(model, variables, x)
    f_lora, a_lora = lj.init(METHODS["lora"], variables["params"], jax.random.key(2), layouts=layouts)
    f_vera, a_vera = lj.init(METHODS["vera"], variables["params"], jax.random.key(2), layouts=layouts)
    a_lora, a_vera = randomize(a_lora), randomize(a_vera)

    @jax.jit
    def run(frozen, adapter):
        return lj.apply(model, {"params": frozen}, adapter, x)

    base = model.apply(variables, x)
    y_lora = run(f_lora, a_lora)
    y_vera = run(f_vera, a_vera)
    y_none = run(variables["params"], {})
    np.testing.assert_allclose(y_lora, model.apply({"params": lj.merge(f_lora, a_lora)}, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_vera, model.apply({"params": lj.merge(f_vera, a_vera)}, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_none, base, rtol=1e-5, atol=1e-5)
    a_other = lj.init(lj.LoRA(rank=2, targets=BLOCK_TARGETS), variables["params"], jax.random.key(2),
                      layouts=layouts)[1]
    a_other = randomize(a_other, seed=5)
    np.testing.assert_allclose(run(f_lora, a_other), model.apply({"params": lj.merge(f_lora, a_other)}, x),
                               rtol=1e-5, atol=1e-5)


class CustomDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return x @ w


class CustomModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return CustomDense(6, name="c")(nn.Dense(8, name="d")(x))


def test_unrecognised_layer_falls_back_to_merge_with_a_warning_and_custom_layers_opt_in():
    model = CustomModel()
    x = jax.random.normal(jax.random.key(0), (3, 5))
    variables = model.init(jax.random.key(1), x)
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r".*/(kernel|w)"), variables["params"], jax.random.key(2))
    adapter = randomize(adapter)
    ref = model.apply({"params": lj.merge(frozen, adapter)}, x)
    with pytest.warns(UserWarning, match=r"merged .*inside the step instead: \['c/w'\]"):
        y = lj.apply(model, {"params": frozen}, adapter, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2 = lj.apply(model, {"params": frozen}, adapter, x,
                      custom_layers={CustomDense: lj.LayerSpec("dense", kernel="w", bias=None)})
    np.testing.assert_allclose(y2, ref, rtol=1e-5, atol=1e-5)


_TRACES: list = []


class _CountingDense(nn.Module):
    """nn.Dense inside a module whose Python body counts how often the model is traced."""

    @nn.compact
    def __call__(self, x):
        _TRACES.append(1)
        return nn.Dense(4, name="d")(x)


def test_apply_traces_the_model_once_when_every_target_is_consumed():
    calls = _TRACES
    model = _CountingDense()
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r"d/kernel"), params, jax.random.key(1))
    calls.clear()
    jax.jit(lambda a, f: lj.apply(model, {"params": f}, a, x)).lower(adapter, frozen)
    assert len(calls) == 1       # one trace (an earlier version probed with eval_shape first: 2)
    calls.clear()
    y = lj.apply(model, {"params": frozen}, randomize(adapter), x)
    assert len(calls) == 1
    np.testing.assert_allclose(y, model.apply({"params": lj.merge(frozen, randomize(adapter))}, x),
                               rtol=1e-5, atol=1e-6)


_FORWARD_TRACES: list = []


@dataclasses.dataclass(frozen=True)
class _CountingLoRA(lj.LoRA):
    """LoRA whose factored forward counts its Python (trace-time) calls."""

    def forward(self, *args, **kwargs):
        _FORWARD_TRACES.append(1)
        return super().forward(*args, **kwargs)


class _ThreeSameLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.Dense(24, name=f"l{i}")(x)
        return x


def test_identical_layers_share_one_trace_of_the_method_forward():
    """The per-layer forward is a nested jit: three layers with the same method, shapes and dtypes are
    traced once (lowering time), with the values of the un-nested computation."""
    model = _ThreeSameLayers()
    x = jax.random.normal(jax.random.key(0), (5, 24))
    params = model.init(jax.random.key(1), x)["params"]
    frozen, adapter = lj.init(_CountingLoRA(rank=3, targets=r"l\d/kernel"), params, jax.random.key(2))
    adapter = randomize(adapter)
    _FORWARD_TRACES.clear()
    y = jax.jit(lambda a, f: lj.apply(model, {"params": f}, a, x))(adapter, frozen)
    assert len(_FORWARD_TRACES) == 1
    np.testing.assert_allclose(y, model.apply({"params": lj.merge(frozen, adapter)}, x), rtol=1e-5, atol=1e-5)


def test_dropout_only_on_adapter_branch():
    model = CustomModel()
    x = jax.random.normal(jax.random.key(0), (64, 5))
    variables = model.init(jax.random.key(1), x)
    method = lj.LoRA(rank=2, targets=r"d/kernel", dropout=0.5)
    frozen, adapter = lj.init(method, variables["params"], jax.random.key(2))
    # With B = 0 the branch is zero, so dropout must not change anything.
    y_fresh = lj.apply(model, {"params": frozen}, adapter, x, dropout_key=jax.random.key(3))
    np.testing.assert_array_equal(y_fresh, model.apply(variables, x))
    adapter = randomize(adapter)
    y_eval = lj.apply(model, {"params": frozen}, adapter, x)
    y_a = lj.apply(model, {"params": frozen}, adapter, x, dropout_key=jax.random.key(3))
    y_b = lj.apply(model, {"params": frozen}, adapter, x, dropout_key=jax.random.key(4))
    y_a2 = lj.apply(model, {"params": frozen}, adapter, x, dropout_key=jax.random.key(3))
    np.testing.assert_array_equal(y_a, y_a2)
    assert not np.allclose(y_a, y_b) and not np.allclose(y_a, y_eval)
    # the branch is unbiased: averaging over many keys approaches the eval output
    ys = jnp.stack([lj.apply(model, {"params": frozen}, adapter, x, dropout_key=jax.random.key(k)) for k in range(200)])
    np.testing.assert_allclose(ys.mean(0), y_eval, atol=0.15 * float(jnp.abs(y_eval).max()))


def test_dora_base_norm_cache_is_used_and_equals_in_step_norm(tiny):
    model, variables, x = tiny
    frozen, adapter = lj.init(METHODS["dora"], variables["params"], jax.random.key(2),
                              layouts=lj.discover(model, variables, x))
    cache = frozen[lj.SHARED_KEY][lj.tree.BASE_SQ_NORMS]
    kernels = dict(lj.tree.flatten_with_paths(lj.base_params(frozen))[0])
    for path, node in lj.tree.adapter_nodes(adapter):
        w = np.asarray(lj.tree.frozen_matrix(kernels[path], node))
        np.testing.assert_allclose(cache[path], (w.astype(np.float64) ** 2).sum(axis=-2), rtol=1e-5)
    adapter = randomize(adapter)
    no_cache = {k: v for k, v in frozen.items() if k != lj.SHARED_KEY}
    y_cached = lj.apply(model, {"params": frozen}, adapter, x)
    y_plain = lj.apply(model, {"params": no_cache}, adapter, x)
    np.testing.assert_allclose(y_cached, y_plain, rtol=1e-5, atol=1e-5)
    # a wrong cache changes the output: the cached value is what the step reads
    bad = {**frozen, lj.SHARED_KEY: {lj.tree.BASE_SQ_NORMS: {p: 4.0 * v for p, v in cache.items()}}}
    assert not np.allclose(lj.apply(model, {"params": bad}, adapter, x), y_cached, atol=1e-3)
