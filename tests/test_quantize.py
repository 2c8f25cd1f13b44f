"""``lj.quantize``: a truly 4-bit base — every linear kernel NF4, the rest optionally bf16 — that ``init``
adapts anywhere, ``apply`` dequantizes layer by layer and ``merge`` returns at full precision."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lj
from lowrank_jax.execution import nnx as lnx
from lowrank_jax.quant import nf4
from lowrank_jax.quant.kernels import is_quantized, kernel_of
from conftest import TinyModel, randomize, rel_err


class MLP(nn.Module):
    width: int = 256
    depth: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Embed(50, self.width, name="embed")(x)
        for i in range(self.depth):
            x = x + nn.Dense(self.width, name=f"fc{i}")(nn.LayerNorm(name=f"ln{i}")(x))
        return nn.Dense(8, name="head")(x).mean(axis=1)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jnp.arange(2 * 16).reshape(2, 16) % 50
    return model, model.init(jax.random.key(0), x)["params"], x


def test_default_targets_are_every_linear_kernel_and_bytes_are_bnb_layout(mlp):
    model, params, x = mlp
    q = lj.quantize(params, lj.NF4())
    flat = dict(lj.tree.flatten_with_paths(q, is_leaf=is_quantized)[0])
    quantized = sorted(p for p, v in flat.items() if is_quantized(v))
    assert quantized == sorted([f"fc{i}/kernel" for i in range(4)] + ["head/kernel"])
    assert flat["embed/embedding"].dtype == jnp.float32 and flat["ln0/scale"].dtype == jnp.float32
    # bytes: exactly nf4.quantize of the torch-layout (out, in) weight (itself tested against bitsandbytes)
    ref = nf4.quantize(np.asarray(params["fc1"]["kernel"]).T, block_size=64, double_quant=True)
    got = flat["fc1/kernel"]
    for name in ("packed", "absmax", "nested_absmax", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)))
    np.testing.assert_array_equal(np.asarray(kernel_of(got)), np.asarray(nf4.dequantize(ref)).T)


def test_rest_dtype_bf16_keeps_kernels_4bit_and_frozen_has_no_float_copy(mlp):
    model, params, x = mlp
    q = lj.quantize(params, lj.NF4(), rest_dtype="bfloat16")
    frozen, adapter = lj.init(lj.LoRA(rank=4, targets=r"fc(1|2)/kernel"), q, jax.random.key(1))
    flat = dict(lj.tree.flatten_with_paths(lj.base_params(frozen), is_leaf=is_quantized)[0])
    for path, v in flat.items():
        if path.endswith("kernel"):
            assert is_quantized(v), path            # no float copy of any kernel, adapted or not
        else:
            assert v.dtype == jnp.bfloat16, path
    full = sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(params))
    stored = sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(lj.base_params(frozen)))
    assert stored < 0.2 * full
    with pytest.raises(ValueError, match=r"rest_dtype must be one of"):
        lj.quantize(params, lj.NF4(), rest_dtype="int8")


def test_quantize_is_traceable_on_abstract_params(mlp):
    model, params, x = mlp
    abstract = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    out = jax.eval_shape(lambda p: lj.quantize(p, lj.NF4(), rest_dtype="bfloat16"), abstract)
    q = out["fc0"]["kernel"]
    assert is_quantized(q) and q.packed.shape == (256 * 256 // 2,) and q.packed.dtype == jnp.uint8
    assert q.absmax.shape == (256 * 256 // 64,) and q.absmax.dtype == jnp.uint8
    assert out["embed"]["embedding"].dtype == jnp.bfloat16


def test_non_finite_kernel_among_many_is_named_after_all_are_dispatched(monkeypatch):
    """The finite flags of every kernel are fetched together at the end (every kernel is quantized
    before any is checked); the error still names the bad kernel (not the first or last) with its
    count and the first index in the kernel's own axes (not its transposed matrix view)."""
    good = jax.random.normal(jax.random.key(0), (16, 8))
    params = {f"l{i}": {"kernel": good + i} for i in range(4)}
    params["l2"]["kernel"] = params["l2"]["kernel"].at[3, 5].set(jnp.inf).at[7, 1].set(jnp.nan)
    calls, real = [], nf4.quantize_flagged

    def counting(x, *a, **k):
        calls.append(round(float(x.reshape(-1)[0] - good[0, 0])))    # which kernel: l_i = good + i
        return real(x, *a, **k)

    monkeypatch.setattr(nf4, "quantize_flagged", counting)
    with pytest.raises(ValueError, match=r"^l2/kernel: cannot NF4-quantize this kernel: .*2 non-finite "
                                         r"value\(s\).*first at index \(3, 5\): inf"):
        lj.quantize(params, lj.NF4(block_size=16))
    assert calls == [0, 1, 2, 3, 2]   # all four dispatched, then l2 re-run by the checked quantizer
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"l2/kernel: cannot NF4-quantize"):
        lj.init(lj.LoRA(rank=2, targets=r"l[0-3]/kernel", quant=lj.NF4(block_size=16)), params, jax.random.key(1))
    del params["l2"]
    q = lj.quantize(params, lj.NF4(block_size=16))
    np.testing.assert_array_equal(
        np.asarray(q["l3"]["kernel"].packed), np.asarray(lj.quant.nf4.quantize(params["l3"]["kernel"].T, 16).packed))


def test_targets_errors_and_layouts():
    params = {"a": {"kernel": jnp.ones((4, 8, 2))}, "b": {"kernel": jnp.ones((8, 8)).at[1, 2].set(jnp.nan)}}
    with pytest.raises(ValueError, match=r"a/kernel: kernel of shape \(4, 8, 2\) has 3 axes"):
        lj.quantize(params, lj.NF4(targets="a/kernel"))
    with pytest.raises(ValueError, match=r"b/kernel: cannot NF4-quantize this kernel: .*non-finite"):
        lj.quantize(params, lj.NF4(targets="b/kernel"))
    with pytest.raises(ValueError, match=r"quantize: NF4 targets \['nothing'\] match no parameter path"):
        lj.quantize(params, lj.NF4(targets="nothing"))
    w = jax.random.normal(jax.random.key(0), (4, 8, 2))
    q = lj.quantize({"a": {"kernel": w}}, lj.NF4(targets="a/kernel", block_size=16),
                    layouts={"a/kernel": lj.Layout(in_axes=(0,), out_axes=(1, 2))})["a"]["kernel"]
    assert q.shape == (16, 4) and lj.quant.kernels.kernel_shape_of(q) == (4, 8, 2)
    back = kernel_of(q)
    assert back.shape == (4, 8, 2) and rel_err(back, w) < 0.15


def test_merge_dequantizes_every_leaf_and_requantize_keeps_unadapted(mlp):
    model, params, x = mlp
    q = lj.quantize(params, lj.NF4())
    frozen, adapter = lj.init(lj.LoRA(rank=4, targets=r"fc1/kernel"), q, jax.random.key(1))
    merged = lj.merge(frozen, randomize(adapter))
    assert all(isinstance(v, jax.Array) for v in jax.tree_util.tree_leaves(merged))
    np.testing.assert_array_equal(np.asarray(merged["fc2"]["kernel"]), np.asarray(kernel_of(q["fc2"]["kernel"])))
    re = lj.merge(frozen, randomize(adapter), requantize=True)
    assert re["fc2"]["kernel"] is q["fc2"]["kernel"] and is_quantized(re["fc1"]["kernel"])


def _step_temps(model, frozen, adapter, x):
    ts = lj.train.make_train_step(model, lambda run, b: jnp.mean(run(b) ** 2), optax.adam(1e-3))
    return ts.step.lower(adapter, ts.init(adapter), frozen, x).compile().memory_analysis().temp_size_in_bytes


def test_whole_base_nf4_step_temporaries_exceed_lora_by_at_most_one_dequantized_kernel(mlp):
    model, params, x = mlp
    method = lj.LoRA(rank=8, targets=r"fc(1|2)/kernel")
    frozen, adapter = lj.init(method, params, jax.random.key(1))
    frozen_q, adapter_q = lj.init(method, lj.quantize(params, lj.NF4()), jax.random.key(1))
    # factored over the quantized base == merge over the dequantized base (outputs and gradients)
    ad = randomize(adapter_q)
    f = lambda a: jnp.sum(lj.apply(model, {"params": frozen_q}, a, x) ** 2)          # noqa: E731
    m = lambda a: jnp.sum(model.apply({"params": lj.merge(frozen_q, a)}, x) ** 2)   # noqa: E731
    assert rel_err(f(ad), m(ad)) < 1e-5
    g_f, g_m = jax.grad(f)(ad), jax.grad(m)(ad)
    for a, b in zip(jax.tree_util.tree_leaves(g_f), jax.tree_util.tree_leaves(g_m)):
        assert rel_err(a, b) < 1e-5
    largest = max(int(np.prod(v.shape)) * 4 for v in jax.tree_util.tree_leaves(params) if v.ndim == 2)
    t_lora, t_q = _step_temps(model, frozen, adapter, x), _step_temps(model, frozen_q, adapter_q, x)
    assert t_q <= t_lora + largest, (t_q, t_lora, largest)


def test_linen_scan_model_over_a_fully_quantized_base(tiny):
    model, variables, x = tiny
    layouts = lj.discover(model, variables, x)
    q = lj.quantize(variables["params"], lj.NF4(block_size=32), layouts=layouts)
    assert all(is_quantized(v) for p, v in lj.tree.flatten_with_paths(q, is_leaf=is_quantized)[0]
               if p.endswith("kernel"))
    frozen, adapter = lj.init(lj.DoRA(rank=2, targets=r"(blocks|block_\d+)/attn/(query|value)/kernel"), q,
                              jax.random.key(0), layouts=layouts)
    ad = randomize(adapter)
    y = jax.jit(lambda a: lj.apply(model, {"params": frozen}, a, x))(ad)
    assert rel_err(y, model.apply({"params": lj.merge(frozen, ad)}, x)) < 1e-5


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(32, 32, rngs=rngs)
        self.b = nnx.Linear(32, 32, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def _squares_of(jaxpr, shape):
    """Count ops that square an array of ``shape`` (a kernel's column norm starts with one)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("integer_pow", "square", "mul") and any(
                getattr(v.aval, "shape", None) == shape for v in eqn.invars):
            if eqn.primitive.name != "mul" or eqn.invars[0] is eqn.invars[-1]:
                n += 1
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
            n += _squares_of(sub, shape)
        for p in eqn.params.values():
            if hasattr(p, "jaxpr"):
                n += _squares_of(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr, shape)
    return n


def test_nnx_dora_reads_the_cached_base_norms():
    model = NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 32))
    frozen, adapter = lj.init(lj.DoRA(rank=4, targets=r"(a|b)/kernel"), lnx.params_of(model), jax.random.key(0))
    assert set(frozen[lj.SHARED_KEY][lj.tree.BASE_SQ_NORMS]) == {"a/kernel", "b/kernel"}
    loss = lambda f: lambda ad: jnp.sum(lnx.apply(model, f, ad, x) ** 2)     # noqa: E731
    cached = jax.make_jaxpr(jax.grad(loss(frozen)))(adapter).jaxpr
    uncached_frozen = {k: v for k, v in frozen.items() if k != lj.SHARED_KEY}
    uncached = jax.make_jaxpr(jax.grad(loss(uncached_frozen)))(adapter).jaxpr
    assert _squares_of(cached, (32, 32)) == 0
    assert _squares_of(uncached, (32, 32)) >= 2                # the check can see a kernel's column norm
    y_c, y_u = lnx.apply(model, frozen, randomize(adapter), x), lnx.apply(model, uncached_frozen, randomize(adapter), x)
    assert rel_err(y_c, y_u) < 1e-6


@pytest.mark.parametrize("bad", ["shape", "block_size", "double_quant", "dtype"])
def test_hand_edited_nf4_arrays_are_refused(bad):
    q = nf4.quantize(np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32), double_quant=True)
    edited = {"shape": q.replace(shape=(8, 32)), "block_size": q.replace(block_size=32),
              "double_quant": q.replace(double_quant=False), "dtype": q.replace(dtype="int8")}[bad]
    with pytest.raises(ValueError, match=r"NF4Array|q: "):
        nf4.dequantize(edited)
    with pytest.raises(ValueError):
        nf4.nf4_matmul(jnp.ones((2, 64)), edited)


def test_transposed_kernel_shapes_share_one_quantizer_program():
    """The quantizer reads each kernel as one flat (out·in) copy: an MLP's up and down projections
    ((in, h) and (h, in)) compile one quantizer program, not two; the bytes are those of quantizing
    each transposed matrix directly."""
    from jax import monitoring
    jax.clear_caches()          # count this test's compiles, whatever ran before in the process
    up = jax.random.normal(jax.random.key(0), (24, 40))
    down = jax.random.normal(jax.random.key(1), (40, 24))
    names, recording = [], [True]

    def listener(name, secs, **kw):
        if recording[0] and name == "/jax/core/compile/backend_compile_duration":
            names.append(kw.get("fun_name", "?"))

    monitoring.register_event_duration_secs_listener(listener)
    try:
        q = lj.quantize({"up": {"kernel": up}, "down": {"kernel": down}}, lj.NF4(block_size=8, double_quant=True))
    finally:
        recording[0] = False
    assert sum("_quantize_impl" in n for n in names) == 1, names
    for name, w in (("up", up), ("down", down)):
        ref = nf4.quantize(w.T, block_size=8, double_quant=True)
        got = q[name]["kernel"]
        assert got.shape == ref.shape == w.T.shape
        for field in ("packed", "absmax", "nested_absmax", "offset"):
            np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(ref, field)))
        np.testing.assert_array_equal(np.asarray(kernel_of(got)), np.asarray(nf4.dequantize(ref).T))


def test_overflow_in_the_storage_dtype_is_named_with_its_kernel_index():
    """The finite check runs on the kernel as stored: a float32 value beyond float16's range in a kernel stored
    as float16 is inf there, and the error counts it and names its index in the kernel's own axes."""
    from lowrank_jax.quant.kernels import quantize_kernel
    w = jnp.ones((8, 16)).at[5, 3].set(1e6)
    with pytest.raises(ValueError, match=r"^k: cannot NF4-quantize this kernel: .*1 non-finite value\(s\).*"
                                         r"first at index \(5, 3\): inf"):
        quantize_kernel(w, lj.Layout((0,), (1,)), lj.NF4(block_size=16), "float16", path="k")
    q = quantize_kernel(w, lj.Layout((0,), (1,)), lj.NF4(block_size=16), "float32", path="k")   # fine in fp32
    assert q.shape == (16, 8)
