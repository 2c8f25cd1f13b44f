"""Method math against independent numpy (float64) implementations and PEFT's own numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.lora import column_norm



@pytest.fixture
def x64():
    """Float64 for closed-form gradient checks, restored afterwards."""
    with jax.enable_x64(True):
        yield


def _rand_adapter(adapter, seed=0, scale=0.3):
    """Replace every adapter array by random nonzero values (float32)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.normal(size=np.shape(x)) * scale, jnp.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


def _params(rng, shapes, dtype=np.float32):
    return {name: {"kernel": jnp.asarray(rng.normal(size=s), dtype)} for name, s in shapes.items()}


# ------------------------------------------------------------------------------ counts

def test_lora_count_of_a_4096_square_kernel():
    assert lj.expected_count(lj.LoRA(rank=8), (4096, 4096)) == 65_536
    params = {"proj": {"kernel": jnp.zeros((4096, 4096), jnp.float32)}}
    _, adapter = lj.init(lj.LoRA(rank=8), params, jax.random.key(0))
    n = lj.count_params(adapter)
    assert n == 65_536 == 8 * (4096 + 4096)
    assert 4096 * 4096 / n > 250


@pytest.mark.parametrize("n_in,n_out,r", [(64, 32, 4), (24, 40, 8)])
def test_dora_and_vera_counts(n_in, n_out, r):
    params = {"l": {"kernel": jnp.ones((n_in, n_out))}}
    _, ad = lj.init(lj.DoRA(rank=r), params, jax.random.key(0))
    assert lj.count_params(ad) == r * (n_in + n_out) + n_out
    _, ad = lj.init(lj.VeRA(rank=r), params, jax.random.key(0))
    assert lj.count_params(ad) == r + n_out


# ------------------------------------------------------------------------------ merge vs numpy

@pytest.mark.parametrize("rslora", [False, True])
def test_lora_merge_matches_numpy(rslora):
    rng = np.random.default_rng(0)
    params = _params(rng, {"a": (12, 20), "b": (20, 7)})
    method = lj.LoRA(rank=4, alpha=6.0, rslora=rslora)
    frozen, adapter = lj.init(method, params, jax.random.key(1))
    adapter = _rand_adapter(adapter)
    merged = lj.merge(frozen, adapter)
    s = 6.0 / (math.sqrt(4) if rslora else 4)
    for name in ("a", "b"):
        w0 = np.asarray(params[name]["kernel"], np.float64)
        a = np.asarray(adapter[name]["kernel"]["a"], np.float64)
        b = np.asarray(adapter[name]["kernel"]["b"], np.float64)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), w0 + s * a @ b, rtol=1e-5, atol=1e-6)


def test_dora_merge_matches_numpy():
    rng = np.random.default_rng(1)
    params = _params(rng, {"a": (16, 10)})
    frozen, adapter = lj.init(lj.DoRA(rank=3, alpha=5.0), params, jax.random.key(2))
    adapter = _rand_adapter(adapter)
    ad = adapter["a"]["kernel"]
    w0 = np.asarray(params["a"]["kernel"], np.float64)
    v = w0 + (5.0 / 3) * np.asarray(ad["a"], np.float64) @ np.asarray(ad["b"], np.float64)
    ref = np.asarray(ad["m"], np.float64)[None, :] * v / np.linalg.norm(v, axis=0, keepdims=True)
    np.testing.assert_allclose(np.asarray(lj.merge(frozen, adapter)["a"]["kernel"]), ref, rtol=1e-5, atol=1e-6)


def test_dora_magnitude_init_is_column_norm_over_input_axis():
    rng = np.random.default_rng(2)
    params = _params(rng, {"a": (16, 10)})
    _, adapter = lj.init(lj.DoRA(rank=3), params, jax.random.key(0))
    np.testing.assert_allclose(adapter["a"]["kernel"]["m"], np.linalg.norm(np.asarray(params["a"]["kernel"]), axis=0),
                               rtol=1e-6)
    assert adapter["a"]["kernel"]["m"].shape == (10,)


def test_vera_merge_matches_numpy_over_layers_of_different_shapes():
    rng = np.random.default_rng(3)
    params = _params(rng, {"small": (6, 9), "wide": (11, 4), "tall": (3, 13)})
    method = lj.VeRA(rank=5, seed=7)
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    adapter = _rand_adapter(adapter)
    a_sh, b_sh = lj.vera_projections(5, max_in=11, max_out=13, seed=7)
    shared = frozen[lj.SHARED_KEY]["vera_0"]
    np.testing.assert_array_equal(shared["a"], a_sh)
    np.testing.assert_array_equal(shared["b"], b_sh)
    merged = lj.merge(frozen, adapter)
    for name, (n_in, n_out) in {"small": (6, 9), "wide": (11, 4), "tall": (3, 13)}.items():
        ad = adapter[name]["kernel"]
        ld = np.asarray(ad["lambda_d"], np.float64)
        lb = np.asarray(ad["lambda_b"], np.float64)
        # PEFT (out, in) form: ΔW = (λ_b B[:out]) @ (λ_d A[:, :in]); Flax kernel is its transpose.
        delta_torch = (lb[:, None] * b_sh[:n_out].astype(np.float64)) @ (ld[:, None] * a_sh[:, :n_in].astype(np.float64))
        ref = np.asarray(params[name]["kernel"], np.float64) + delta_torch.T
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), ref, rtol=1e-5, atol=1e-6)
    assert lj.SHARED_KEY not in merged


def test_vera_projections_equal_peft_test_vector():
    a, b = lj.vera_projections(4, 8, 6, seed=0)
    np.testing.assert_allclose(a[0], [-0.0064838, 0.4645738, -0.7127780, -0.6373419, -0.3335535, 0.2322311,
                                      -0.0171587, 0.6866624], atol=5e-8)
    np.testing.assert_allclose(b[:, 0], [-0.7938547, -0.7149332, 0.0644112, -0.8849593, -0.5431683, 0.4860794],
                               atol=5e-8)


def test_vera_projections_equal_torch_generator():
    torch = pytest.importorskip("torch")
    for r, max_in, max_out, seed in [(4, 8, 6, 0), (16, 48, 30, 123)]:
        g = torch.Generator(device="cpu").manual_seed(seed)
        ta = torch.empty(r, max_in)
        tb = torch.empty(max_out, r)
        ta.uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=g)
        tb.uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
        a, b = lj.vera_projections(r, max_in, max_out, seed)
        np.testing.assert_array_equal(a, ta.numpy())
        np.testing.assert_array_equal(b, tb.numpy())


def test_vera_projections_equal_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(10, 7, bias=False)
            self.v = torch.nn.Linear(6, 12, bias=False)

        def forward(self, x):
            return self.q(x)

    model = peft.get_peft_model(Net(), peft.VeraConfig(r=4, target_modules=["q", "v"], projection_prng_key=5))
    a_t = dict(model.named_buffers())
    va = next(v for k, v in a_t.items() if k.endswith("vera_A.default"))
    vb = next(v for k, v in a_t.items() if k.endswith("vera_B.default"))
    a, b = lj.vera_projections(4, 10, 12, seed=5)
    np.testing.assert_array_equal(a, va.numpy())
    np.testing.assert_array_equal(b, vb.numpy())


# ------------------------------------------------------------------------------ init schemes

def test_lora_init_distributions():
    params = {"l": {"kernel": jnp.zeros((400, 300))}}
    _, ad = lj.init(lj.LoRA(rank=16), params, jax.random.key(0))
    a = np.asarray(ad["l"]["kernel"]["a"])
    assert np.abs(a).max() <= 1 / math.sqrt(400)
    assert np.abs(a).max() > 0.95 / math.sqrt(400)
    np.testing.assert_allclose(a.std(), 1 / math.sqrt(3 * 400), rtol=0.05)
    assert not np.any(np.asarray(ad["l"]["kernel"]["b"]))
    _, ad = lj.init(lj.LoRA(rank=16, init="gaussian"), params, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(ad["l"]["kernel"]["a"]).std(), 1 / 16, rtol=0.05)


def test_pissa_merge_is_identity_and_spans_top_subspace():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(30, 20)).astype(np.float32)
    params = {"l": {"kernel": jnp.asarray(w)}}
    method = lj.LoRA(rank=4, alpha=8.0, init="pissa")
    frozen, adapter = lj.init(method, params, jax.random.key(0))
    merged = np.asarray(lj.merge(frozen, adapter)["l"]["kernel"])
    assert np.linalg.norm(merged - w) / np.linalg.norm(w) < 1e-6
    a = np.asarray(adapter["l"]["kernel"]["a"], np.float64)
    b = np.asarray(adapter["l"]["kernel"]["b"], np.float64)
    u, s, vh = np.linalg.svd(w.astype(np.float64))
    np.testing.assert_allclose(method.scaling * a @ b, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
    resid = np.asarray(frozen["l"]["kernel"], np.float64)
    np.testing.assert_allclose(np.linalg.svd(resid, compute_uv=False)[:3], s[4:7], rtol=1e-4)


# ------------------------------------------------------------------------------ DoRA gradients

def _dora_case(detach):
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(8, 6))
    a = rng.normal(size=(8, 3)) * 0.3
    b = rng.normal(size=(3, 6)) * 0.3
    m = rng.uniform(0.5, 2.0, size=(6,))
    x = rng.normal(size=(5, 8))
    t = rng.normal(size=(5, 6))
    method = lj.DoRA(rank=3, alpha=3.0, detach_norm=detach)
    params = {"a": jnp.asarray(a), "b": jnp.asarray(b), "m": jnp.asarray(m)}
    return method, w0, params, x, t


def _f64_merge(method, w0, p):
    v = jnp.asarray(w0) + method.scaling * p["a"] @ p["b"]
    n = jnp.sqrt(jnp.sum(v * v, axis=0))
    if method.detach_norm:
        n = jax.lax.stop_gradient(n)
    return p["m"] * v / n


def test_dora_gradient_closed_form_undetached(x64):
    method, w0, params, x, t = _dora_case(detach=False)

    def loss_w(wp):
        return 0.5 * jnp.sum((jnp.asarray(x) @ wp - t) ** 2)

    def loss(p):
        return loss_w(method.merge_matrix(jnp.asarray(w0), p))

    grads = jax.grad(loss)(params)
    v = w0 + method.scaling * np.asarray(params["a"]) @ np.asarray(params["b"])
    n = np.linalg.norm(v, axis=0)
    wp = np.asarray(params["m"]) * v / n
    g_w = np.asarray(jax.grad(loss_w)(jnp.asarray(wp)))  # ∇_{W'} L
    grad_m = np.sum(g_w * v / n, axis=0)                  # ⟨∇W'L, V'/‖V'‖⟩ per column
    np.testing.assert_allclose(grads["m"], grad_m, rtol=1e-10)
    # ∇V' L = (m/‖V'‖)(I − V'V'ᵀ/‖V'‖²) ∇W'L, per column; then chain rule to A and B.
    g_v = np.zeros_like(v)
    for j in range(v.shape[1]):
        vj = v[:, j]
        proj = np.eye(len(vj)) - np.outer(vj, vj) / (n[j] ** 2)
        g_v[:, j] = (params["m"][j] / n[j]) * proj @ g_w[:, j]
    np.testing.assert_allclose(grads["a"], method.scaling * g_v @ np.asarray(params["b"]).T, rtol=1e-9)
    np.testing.assert_allclose(grads["b"], method.scaling * np.asarray(params["a"]).T @ g_v, rtol=1e-9)


def test_dora_gradient_detached_norm_is_constant(x64):
    method, w0, params, x, t = _dora_case(detach=True)

    def loss(p):
        return 0.5 * jnp.sum((jnp.asarray(x) @ method.merge_matrix(jnp.asarray(w0), p) - t) ** 2)

    v = w0 + method.scaling * np.asarray(params["a"]) @ np.asarray(params["b"])
    n_const = np.linalg.norm(v, axis=0)

    def loss_const(p):
        vv = jnp.asarray(w0) + method.scaling * p["a"] @ p["b"]
        return 0.5 * jnp.sum((jnp.asarray(x) @ (p["m"] * vv / n_const) - t) ** 2)

    g = jax.grad(loss)(params)
    ref = jax.grad(loss_const)(params)
    for k in ("a", "b", "m"):
        np.testing.assert_allclose(g[k], ref[k], rtol=1e-12)
    und = jax.grad(lambda p: 0.5 * jnp.sum((jnp.asarray(x) @ _f64_merge(lj.DoRA(rank=3, alpha=3.0, detach_norm=False),
                                                                           w0, p) - t) ** 2))(params)
    assert not np.allclose(und["a"], g["a"])  # detaching really changes the gradient


def test_dora_factored_scale_equals_norm_of_merged_weight(x64):
    method, w0, params, _, _ = _dora_case(detach=False)
    scale = method.output_scale(jnp.asarray(w0, jnp.float32), {k: v.astype(jnp.float32) for k, v in params.items()})
    v = w0 + method.scaling * np.asarray(params["a"]) @ np.asarray(params["b"])
    np.testing.assert_allclose(scale, np.asarray(params["m"]) / np.linalg.norm(v, axis=0), rtol=2e-6)


def test_column_norm():
    w = np.arange(12.0).reshape(4, 3)
    np.testing.assert_allclose(column_norm(jnp.asarray(w)), np.sqrt((w ** 2).sum(0)), rtol=1e-6)


# ------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an integer >= 1, got 0"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(alpha=0.0), "alpha must be a finite number > 0, got 0.0"),
    (dict(alpha=-1), "alpha must be"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(init="svd"), "init must be one of"),
    (dict(targets="(unclosed"), "invalid regular expression"),
    (dict(targets=[]), "targets must be a regex string or a non-empty list"),
])
def test_lora_and_dora_reject_bad_arguments(kwargs, match):
    for cls in (lj.LoRA, lj.DoRA):
        with pytest.raises((ValueError, TypeError), match=match):
            cls(**kwargs)


def test_vera_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        lj.VeRA(rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        lj.VeRA(dropout=1.5)
    with pytest.raises(ValueError, match="seed must be an integer"):
        lj.VeRA(seed=-1)


def test_methods_are_hashable_and_static_under_jit():
    m = lj.LoRA(rank=4, targets=["a", "b"])
    assert hash(m) == hash(lj.LoRA(rank=4, targets=("a", "b")))
    assert {m, lj.DoRA(), lj.VeRA()}

    calls = []

    def f(x, method):
        calls.append(method)
        return x * method.scaling

    jf = jax.jit(f, static_argnums=1)
    assert float(jf(2.0, lj.LoRA(rank=4, alpha=8.0))) == 4.0
    assert float(jf(2.0, lj.LoRA(rank=4, alpha=8.0))) == 4.0
    assert float(jf(2.0, lj.LoRA(rank=4, alpha=2.0))) == 1.0
    assert len(calls) == 2  # equal methods reuse the trace, a different one retraces
