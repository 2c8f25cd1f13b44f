"""init / merge / count over whole trees: bitwise identity at init, layouts, multi-method, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj

METHODS = [lj.LoRA(rank=4), lj.DoRA(rank=4), lj.VeRA(rank=16)]


def _params(dtype):
    rng = np.random.default_rng(0)
    return {
        "enc": {
            "layer_0": {"query": {"kernel": jnp.asarray(rng.normal(size=(32, 16)), dtype),
                                  "bias": jnp.asarray(rng.normal(size=(16,)), dtype)},
                        "mlp": {"kernel": jnp.asarray(rng.normal(size=(16, 48)), dtype)}},
        },
        "norm": {"scale": jnp.ones((16,), dtype)},
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_merge_of_init_is_params_bitwise(method, dtype):
    params = _params(dtype)
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    merged = lj.merge(frozen, adapter)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for got, want in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # adapters are float32 over a bf16 base (PEFT's autocast_adapter_dtype)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(adapter))


def test_adapter_holds_only_trainable_arrays_and_is_self_describing():
    params = _params(jnp.float32)
    _, adapter = lj.init(lj.LoRA(rank=4, targets=r".*/query/kernel"), params, jax.random.key(0))
    node = adapter["enc"]["layer_0"]["query"]["kernel"]
    assert isinstance(node, lj.AdapterParams)
    assert set(node) == {"a", "b"} and node["a"].shape == (32, 4) and node.b.shape == (4, 16)
    assert node.method == lj.LoRA(rank=4, targets=r".*/query/kernel")
    assert len(jax.tree_util.tree_leaves(adapter)) == 2
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapter)[0]]
    assert paths == ["['enc']['layer_0']['query']['kernel'].a", "['enc']['layer_0']['query']['kernel'].b"]


def test_several_methods_with_disjoint_targets():
    params = _params(jnp.float32)
    methods = [lj.DoRA(rank=2, targets=r".*/query/kernel"), lj.LoRA(rank=3, targets=r".*/mlp/kernel")]
    frozen, adapter = lj.init(methods, params, jax.random.key(0))
    layer = adapter["enc"]["layer_0"]
    assert set(layer["query"]["kernel"]) == {"a", "b", "m"}
    assert set(layer["mlp"]["kernel"]) == {"a", "b"}
    assert lj.count_params(adapter) == 2 * (32 + 16) + 16 + 3 * (16 + 48)


def test_stacked_and_multi_axis_kernels_get_one_adapter_per_layer():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 8, 2, 4)).astype(np.float32)  # (layers, d, heads, head_dim)
    params = {"blocks": {"q": {"kernel": jnp.asarray(w)}}}
    layout = lj.Layout(in_axes=(0,), out_axes=(1, 2), stack=1)
    frozen, adapter = lj.init(lj.LoRA(rank=2), params, jax.random.key(0), layouts={r"blocks/q/kernel": layout})
    node = adapter["blocks"]["q"]["kernel"]
    assert node["a"].shape == (3, 8, 2) and node["b"].shape == (3, 2, 8)
    # layers get different random A
    assert not np.allclose(node["a"][0], node["a"][1])
    node = node.replace(b=jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32))
    merged = np.asarray(lj.merge(frozen, {"blocks": {"q": {"kernel": node}}})["blocks"]["q"]["kernel"])
    for layer in range(3):
        delta = 4.0 * (np.asarray(node["a"][layer]) @ np.asarray(node["b"][layer])).reshape(8, 2, 4)  # s = 8/2
        np.testing.assert_allclose(merged[layer], w[layer] + delta, rtol=1e-5, atol=1e-6)


def test_layout_matrix_round_trip():
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    lay = lj.Layout(in_axes=(2, 0), out_axes=(1,), stack=1)   # per-layer (3, 4, 5): in = axes 2, 0; out = 1
    m = lay.to_matrix(x)
    assert m.shape == (2, 5 * 3, 4)
    np.testing.assert_array_equal(lay.from_matrix(m, x.shape), x)
    np.testing.assert_array_equal(m[1], np.transpose(np.asarray(x[1]), (2, 0, 1)).reshape(15, 4))


# ------------------------------------------------------------------------------ errors

def test_target_matching_nothing_lists_existing_paths():
    with pytest.raises(ValueError, match=r"match no parameter path.*enc/layer_0/query/kernel"):
        lj.init(lj.LoRA(targets=r".*/nope/kernel"), _params(jnp.float32), jax.random.key(0))


def test_rank_larger_than_matrix_names_path_and_shape():
    with pytest.raises(ValueError, match=r"enc/layer_0/query/kernel: rank 20 exceeds min\(in, out\) = 16"):
        lj.init(lj.LoRA(rank=20, targets=r".*/query/kernel"), _params(jnp.float32), jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank 20 exceeds"):
        lj.init(lj.DoRA(rank=20, targets=r".*/query/kernel"), _params(jnp.float32), jax.random.key(0))
    lj.init(lj.VeRA(rank=20, targets=r".*/query/kernel"), _params(jnp.float32), jax.random.key(0))  # allowed


def test_non_float_or_one_dim_target_is_rejected():
    params = _params(jnp.float32)
    with pytest.raises(ValueError, match=r"enc/layer_0/query/bias: targeted leaf must be a floating-point array "
                                         r"with at least 2 dims.*shape=\(16,\)"):
        lj.init(lj.LoRA(targets=r".*/query/bias"), params, jax.random.key(0))
    params["ids"] = {"kernel": jnp.zeros((4, 4), jnp.int32)}
    with pytest.raises(ValueError, match=r"ids/kernel: targeted leaf must be a floating-point.*int32"):
        lj.init(lj.LoRA(rank=2, targets=r"ids/kernel"), params, jax.random.key(0))


def test_two_methods_on_one_leaf_is_an_error():
    with pytest.raises(ValueError, match=r"enc/layer_0/query/kernel is targeted by two methods"):
        lj.init([lj.LoRA(rank=2, targets=r".*kernel"), lj.DoRA(rank=2, targets=r".*/query/kernel")],
                _params(jnp.float32), jax.random.key(0))


def test_ambiguous_kernel_without_layout_is_an_error():
    params = {"q": {"kernel": jnp.zeros((8, 2, 4))}}
    with pytest.raises(ValueError, match=r"q/kernel: kernel of shape \(8, 2, 4\) has 3 axes.*layouts="):
        lj.init(lj.LoRA(rank=2), params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"does not fit Layout"):
        lj.init(lj.LoRA(rank=2), params, jax.random.key(0), layouts={"q/kernel": lj.Layout()})


def test_merge_with_mismatched_frozen_tree_names_path_and_shapes():
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r".*/query/kernel"), _params(jnp.float32), jax.random.key(0))
    other = jax.tree_util.tree_map(lambda x: x, frozen)
    other["enc"]["layer_0"]["query"]["kernel"] = jnp.zeros((30, 16))
    with pytest.raises(ValueError, match=r"enc/layer_0/query/kernel: frozen kernel has shape \(30, 16\) but the "
                                         r"adapter was made for shape \(32, 16\)"):
        lj.merge(other, adapter)
    del other["enc"]["layer_0"]["query"]
    with pytest.raises(ValueError, match=r"adapter path 'enc/layer_0/query/kernel' is not in the frozen tree"):
        lj.merge(other, adapter)
    bad = adapter["enc"]["layer_0"]["query"]["kernel"].replace(a=jnp.zeros((32, 3)))
    with pytest.raises(ValueError, match=r"adapter array 'a' has shape \(32, 3\), expected \(32, 2\)"):
        lj.merge(frozen, {"enc": {"layer_0": {"query": {"kernel": bad}}}})


def test_bad_method_argument():
    with pytest.raises(TypeError, match="expected a method"):
        lj.init("lora", _params(jnp.float32), jax.random.key(0))


@pytest.mark.parametrize("raw_key", [False, True], ids=["typed_key", "raw_PRNGKey"])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("method", [lj.LoRA(rank=3, alpha=6.0, targets=r"w"), lj.VeRA(rank=4, targets=r"w")],
                         ids=["lora", "vera"])
def test_stacked_init_of_a_shape_only_method_equals_the_vmapped_per_layer_init(method, jitted, raw_key):
    """A method that reads only W0's shape is initialised layer by layer on a stacked kernel (no batched
    random program to compile); the arrays are bitwise those of vmapping its per-layer init over the layer
    keys ``split(fold_in(key, crc32(path)), n_layers)`` — the documented key scheme, unchanged."""
    import zlib
    w = jax.random.normal(jax.random.key(0), (3, 2, 6, 5))          # (stack 3, 2), in 6, out 5
    key = jax.random.PRNGKey(7) if raw_key else jax.random.key(7)
    run = lambda w, key: lj.init(method, {"w": w}, key, layouts={"w": lj.Layout((0,), (1,), stack=2)})  # noqa: E731
    frozen, adapter = (jax.jit(run) if jitted else run)(w, key)
    leaf_key = jax.random.fold_in(key, zlib.crc32(b"w") & 0x7FFFFFFF)
    keys = jax.random.split(leaf_key, 6)
    shared = lj.tree.shared_of(frozen).get("vera_0") if isinstance(method, lj.VeRA) else None
    ref = jax.vmap(lambda k: method.init_matrix(k, jnp.zeros((6, 5)), shared)[0])(keys)
    node = adapter["w"]
    assert sorted(node.params) == sorted(ref)
    for name, arr in node.params.items():
        assert arr.shape == (3, 2) + ref[name].shape[1:]
        np.testing.assert_array_equal(np.asarray(arr).reshape(ref[name].shape), np.asarray(ref[name]), err_msg=name)


def test_a_shape_only_method_that_reads_the_base_is_refused():
    """``reads_base_at_init = False`` with a cache or a new base cannot be honoured: init raises, naming it."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class CachedLoRA(lj.LoRA):
        @property
        def reads_base_at_init(self):
            return False

        def frozen_cache(self, w):
            return jnp.sum(w * w, axis=0)

    @dataclasses.dataclass(frozen=True)
    class ResidualLoRA(lj.LoRA):
        @property
        def reads_base_at_init(self):
            return False

        def init_matrix(self, key, w, shared=None):
            params, _ = super().init_matrix(key, w, shared)
            return params, jnp.zeros(w.shape)

    @dataclasses.dataclass(frozen=True)
    class NormLoRA(lj.LoRA):        # reads W0 in init_matrix but inherits LoRA's reads_base_at_init = False
        def init_matrix(self, key, w, shared=None):
            params, w_new = super().init_matrix(key, w, shared)
            return {**params, "a": params["a"] * jnp.linalg.norm(w)}, w_new

    params = {"w": jnp.ones((6, 5))}
    for run in (lj.init, jax.jit(lj.init, static_argnums=0),
                lambda m, p, k: jax.eval_shape(lambda p, k: lj.init(m, p, k), p, k)):
        with pytest.raises(TypeError, match=r"NormLoRA.init_matrix failed on W0 given as a shape only .*"
                                            r"must set reads_base_at_init = True"):
            run(NormLoRA(rank=2, targets="w"), params, jax.random.key(0))
    with pytest.raises(TypeError, match=r"CachedLoRA: reads_base_at_init is False but frozen_cache reads W0"):
        lj.init(CachedLoRA(rank=2, targets="w"), params, jax.random.key(0))
    with pytest.raises(TypeError, match=r"ResidualLoRA: reads_base_at_init is False but init_matrix returned a new"):
        lj.init(ResidualLoRA(rank=2, targets="w"), params, jax.random.key(0))


@pytest.mark.parametrize("method", [lj.LoRA(rank=2, targets="w"), lj.VeRA(rank=2, targets="w"),
                                    lj.DoRA(rank=2, targets="w")], ids=["lora", "vera", "dora"])
def test_init_of_an_empty_stack(method):
    frozen, adapter = lj.init(method, {"w": jnp.ones((0, 6, 5))}, jax.random.key(0),
                              layouts={"w": lj.Layout((0,), (1,), stack=1)})
    assert all(a.shape[0] == 0 for a in adapter["w"].params.values())


def test_init_names_the_first_non_finite_index_of_a_float_kernel():
    w = jnp.ones((4, 3)).at[2, 1].set(jnp.nan).at[3, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"^init: w: the kernel contains 2 non-finite value\(s\) \(NaN/inf\); "
                                         r"first at index \(2, 1\): nan \(checked in float32\)"):
        lj.init(lj.LoRA(rank=2, targets="w"), {"w": w}, jax.random.key(0))
