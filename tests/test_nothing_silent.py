"""Nothing silent (core): apply checks what merge checks, degenerate numerics are defined, every option
does what it says on every path, donated buffers and NaN batches are reported. (Files and checkpoints:
tests/test_io_reliability.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from conftest import randomize, rel_err


class Head(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out, name="head")(nn.Dense(6, name="body")(x))


def _setup(out=4, method=None, seed=0):
    model = Head(out)
    x = jax.random.normal(jax.random.key(seed), (3, 5))
    params = model.init(jax.random.key(1), x)["params"]
    method = method or lj.LoRA(rank=1, targets=r"head/kernel")
    return model, params, x, method


# ------------------------------------------------------------------- apply checks what merge checks

def test_adapter_of_another_model_is_refused_by_apply_with_merges_message():
    model4, params4, x, method = _setup(out=4)
    _, params1, _, _ = _setup(out=1)
    _, adapter1 = lj.init(method, params1, jax.random.key(0))
    frozen4, _ = lj.init(method, params4, jax.random.key(0))
    with pytest.raises(ValueError) as merge_err:
        lj.merge(frozen4, adapter1)
    with pytest.raises(ValueError) as apply_err:
        lj.apply(model4, {"params": frozen4}, adapter1, x)
    assert "head/kernel: frozen kernel has shape (6, 4) but the adapter was made for shape (6, 1)" in str(merge_err.value)
    assert str(apply_err.value).split(": ", 1)[1] == str(merge_err.value).split(": ", 1)[1]


@pytest.mark.parametrize("case", ["array_shape", "missing_array", "integer_array", "vera_shared", "dora_cache"])
def test_apply_and_merge_refuse_edited_adapters_alike(case):
    model, params, x, _ = _setup()
    method = lj.VeRA(rank=4, targets="head/kernel") if case == "vera_shared" else lj.DoRA(rank=2, targets="head/kernel")
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    node = adapter["head"]["kernel"]
    if case == "array_shape":
        node = node.replace(b=jnp.zeros((2, 5)))
        want = r"head/kernel: adapter array 'b' has shape \(2, 5\), expected \(2, 4\)"
    elif case == "missing_array":
        node = lj.AdapterParams({"a": node["a"], "b": node["b"]}, node.method, node.layout, node.shape, node.dtype)
        want = r"head/kernel: adapter arrays \['a', 'b'\] do not match DoRA's \['a', 'b', 'm'\]"
    elif case == "integer_array":
        node = node.replace(m=jnp.zeros((4,), jnp.int32))
        want = r"head/kernel: adapter array 'm' must be floating"
    elif case == "vera_shared":
        frozen = {**frozen, lj.SHARED_KEY: {"vera_0": {"a": jnp.zeros((3, 6)), "b": jnp.zeros((4, 3))}}}
        want = r"head/kernel: shared array vera_0/a has shape \(3, 6\); this kernel needs at least \(4, 6\)"
    else:
        cache = frozen[lj.SHARED_KEY][lj.tree.BASE_SQ_NORMS]
        frozen = {**frozen, lj.SHARED_KEY: {lj.tree.BASE_SQ_NORMS: {"head/kernel": jnp.ones((3,)), **{
            k: v for k, v in cache.items() if k != "head/kernel"}}}}
        want = r"head/kernel: cached base norms have shape \(3,\), the kernel needs \(4,\)"
    adapter = {"head": {"kernel": node}}
    with pytest.raises(ValueError, match="merge: " + want):
        lj.merge(frozen, adapter)
    with pytest.raises(ValueError, match="apply: " + want):
        lj.apply(model, {"params": frozen}, adapter, x)


# ---------------------------------------------------------------------------- degenerate numerics

@pytest.mark.parametrize("detach", [True, False])
def test_dora_on_zero_output_columns_is_finite_and_identity_at_init(detach):
    model, params, x, _ = _setup()
    params = jax.tree_util.tree_map(lambda v: v, params)
    params["head"]["kernel"] = params["head"]["kernel"].at[:, 1].set(0.0)          # a dead output unit
    params["body"]["kernel"] = jnp.zeros_like(params["body"]["kernel"])            # a zero-initialised layer
    method = lj.DoRA(rank=2, targets=r"(head|body)/kernel", detach_norm=detach)
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    merged = lj.merge(frozen, adapter)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y = lj.apply(model, {"params": frozen}, adapter, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply({"params": params}, x)), atol=1e-6)
    grads = jax.grad(lambda a: jnp.sum(lj.apply(model, {"params": frozen}, a, x) ** 2))(adapter)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    # after a step the dead units learn (a zero column has no direction: it trains as LoRA until it has one)
    ad = randomize(adapter, scale=0.5)
    y_f = lj.apply(model, {"params": frozen}, ad, x)
    y_m = model.apply({"params": lj.merge(frozen, ad)}, x)
    assert bool(jnp.all(jnp.isfinite(y_f))) and rel_err(y_f, y_m) < 1e-5


def test_nan_or_inf_in_a_kernel_is_an_error_naming_it():
    model, params, x, method = _setup()
    params["head"]["kernel"] = params["head"]["kernel"].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"init: head/kernel: the kernel contains 1 non-finite value"):
        lj.init(method, params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"head/kernel: cannot NF4-quantize this kernel"):
        lj.quantize(params, lj.NF4())


@pytest.mark.parametrize("double_quant", [False, True])
def test_an_nf4_kernel_with_non_finite_scales_is_an_error_naming_it(double_quant):
    model, params, x, method = _setup()
    q = lj.quantize(params, lj.NF4(double_quant=double_quant))
    k = q["head"]["kernel"]
    assert bool(lj.nf4.all_finite(k))
    field = "offset" if double_quant else "absmax"
    q["head"]["kernel"] = k.replace(**{field: getattr(k, field).at[0].set(jnp.nan) if not double_quant
                                       else jnp.full_like(k.offset, jnp.nan)})
    assert not bool(jnp.all(jnp.isfinite(lj.nf4.dequantize(q["head"]["kernel"]))))   # the scales reach w
    with pytest.raises(ValueError, match=r"init: head/kernel: the kernel contains non-finite NF4 block scales"):
        lj.init(method, q, jax.random.key(0))


def test_two_paths_that_print_alike_are_refused():
    params = {"a/b": {"kernel": jnp.ones((4, 4))}, "a": {"b": {"kernel": jnp.ones((4, 4))}}}
    with pytest.raises(ValueError, match=r"two different parameter paths map to the same name 'a/b/kernel'"):
        lj.init(lj.LoRA(rank=1, targets=r".*kernel"), params, jax.random.key(0))


# --------------------------------------------------------------------- options on every path

def test_dropout_with_the_merge_path_is_refused_not_ignored():
    model, params, x, _ = _setup()
    frozen, adapter = lj.init(lj.LoRA(rank=1, targets="head/kernel", dropout=0.5), params, jax.random.key(0))
    ts = lj.train.make_train_step(model, lambda run, b: jnp.mean(run(b) ** 2), optax.sgd(0.1), factored=False)
    with pytest.raises(ValueError, match=r"factored=False merges the weights, so the adapter-input dropout of "
                                         r"\['head/kernel'\] cannot be applied"):
        ts.step(adapter, ts.init(adapter), frozen, x, jax.random.key(1))
    # without a key (evaluation semantics) the merge path is exact
    ts.step(adapter, ts.init(adapter), frozen, x)


def test_reusing_a_donated_adapter_says_the_step_donates():
    model, params, x, method = _setup()
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    ts = lj.train.make_train_step(model, lambda run, b: jnp.mean(run(b) ** 2), optax.sgd(0.1))
    opt = ts.init(adapter)
    new, opt2, _ = ts.step(adapter, opt, frozen, x)
    if not adapter["head"]["kernel"]["a"].is_deleted():
        pytest.skip("this backend did not donate the buffers")
    with pytest.raises(RuntimeError, match=r"adapter\['head'\]\['kernel'\]\.a was donated to an earlier call of "
                                           r"this step .* donate=False"):
        ts.step(adapter, opt2, frozen, x)
    ts.step(new, opt2, frozen, x)                              # the returned values work


def test_nan_guard_skips_a_bad_batch_and_counts_it():
    model, params, x, method = _setup()
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    ts = lj.train.make_train_step(model, lambda run, b: jnp.mean(run(b) ** 2), optax.adam(0.1), nan_guard=True,
                                  donate=False)
    opt = ts.init(adapter)
    a1, opt, _ = ts.step(adapter, opt, frozen, x)
    a2, opt, loss = ts.step(a1, opt, frozen, x.at[0, 0].set(jnp.nan))
    assert not np.isfinite(float(loss))
    for u, v in zip(jax.tree_util.tree_leaves(a1), jax.tree_util.tree_leaves(a2)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert lj.train.skipped_steps(opt) == 1
    a3, opt, _ = ts.step(a2, opt, frozen, x)
    assert lj.train.skipped_steps(opt) == 1
    assert any(not np.array_equal(np.asarray(u), np.asarray(v))
               for u, v in zip(jax.tree_util.tree_leaves(a2), jax.tree_util.tree_leaves(a3)))
    with pytest.raises(ValueError, match="nan_guard=True"):
        lj.train.skipped_steps(optax.adam(0.1).init(adapter))


def test_rslora_and_dtypes_hold_on_the_factored_and_merge_paths():
    model, params, x, _ = _setup()
    bf = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), params)
    for method in (lj.LoRA(rank=2, alpha=4.0, targets="head/kernel", rslora=True),
                   lj.DoRA(rank=2, alpha=4.0, targets="head/kernel", rslora=True)):
        assert method.scaling == pytest.approx(4.0 / np.sqrt(2))
        frozen, adapter = lj.init(method, params, jax.random.key(0))
        ad = randomize(adapter)
        node = ad["head"]["kernel"]
        w0 = np.asarray(params["head"]["kernel"], np.float64)
        delta = method.scaling * np.asarray(node["a"], np.float64) @ np.asarray(node["b"], np.float64)
        want = w0 + delta
        if isinstance(method, lj.DoRA):
            want = want * (np.asarray(node["m"], np.float64) / np.linalg.norm(want, axis=0))[None, :]
        np.testing.assert_allclose(np.asarray(lj.merge(frozen, ad)["head"]["kernel"]), want, rtol=1e-5, atol=1e-6)
        fb, ab = lj.init(method, bf, jax.random.key(0))
        assert lj.apply(model, {"params": fb}, randomize(ab), x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
