"""Research instruments: DoRA's ΔM/ΔD, factored update spectra, intruder dimensions — against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from conftest import randomize

TARGETS = r"blocks/.*kernel"
from lowrank_jax import analysis as la


def _md_loops(w0, w):
    """ΔM, ΔD by explicit loops over output units (columns), float64."""
    w0, w = np.asarray(w0, np.float64), np.asarray(w, np.float64)
    n_in, n_out = w0.shape
    dm = dd = 0.0
    for n in range(n_out):
        dot = sq0 = sq1 = 0.0
        for i in range(n_in):
            dot += w0[i, n] * w[i, n]
            sq0 += w0[i, n] ** 2
            sq1 += w[i, n] ** 2
        dm += abs(sq1 ** 0.5 - sq0 ** 0.5)
        dd += 1.0 - dot / (sq0 ** 0.5 * sq1 ** 0.5)
    return dm / n_out, dd / n_out


def _rng_matrix(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------- magnitude / direction

def test_magnitude_direction_by_hand():
    # column 0: (1,0) -> (2,1): |√5 − 1|, 1 − 2/√5;  column 1 unchanged.
    r = la.magnitude_direction(jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([[2.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(float(r.delta_m), (5 ** 0.5 - 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(r.delta_d), (1 - 2 / 5 ** 0.5) / 2, rtol=1e-6)


def test_magnitude_direction_matches_loops():
    w0 = _rng_matrix(0, 7, 5)
    w = w0 + 0.3 * _rng_matrix(1, 7, 5)
    r = la.magnitude_direction(w0, w)
    dm, dd = _md_loops(w0, w)
    np.testing.assert_allclose(float(r.delta_m), dm, rtol=1e-5)
    np.testing.assert_allclose(float(r.delta_d), dd, rtol=1e-5)
    # a pure rescaling of columns moves magnitude only; a sign flip is 1 − cos = 2
    r = la.magnitude_direction(w0, w0 * np.array([1.0, 2.0, 1.0, 0.5, 1.0], np.float32))
    assert float(r.delta_d) < 1e-7 and float(r.delta_m) > 0
    np.testing.assert_allclose(float(la.magnitude_direction(w0, -w0).delta_d), 2.0, rtol=1e-6)


def test_magnitude_direction_small_update_has_no_cancellation():
    w0 = _rng_matrix(2, 64, 8)
    w = w0 + 1e-4 * _rng_matrix(3, 64, 8)
    dd = _md_loops(w0.astype(np.float64), w.astype(np.float64))[1]  # ~1e-9: below float32's 1 − cos resolution
    np.testing.assert_allclose(float(la.magnitude_direction(w0, w).delta_d), dd, rtol=1e-3)


def test_magnitude_direction_zero_columns():
    w0 = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 2.0]], np.float32)
    w = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], np.float32)   # col 1 zero in both; col 2 zeroed
    r = la.magnitude_direction(w0, w)
    np.testing.assert_allclose(float(r.delta_d), (0 + 0 + 1) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(r.delta_m), 2 / 3, rtol=1e-6)


def test_magnitude_direction_per_layer_with_layout():
    layout = lj.Layout(in_axes=(0,), out_axes=(1, 2), stack=1)   # (layers, d, heads, head_dim)
    w0 = _rng_matrix(4, 3, 6, 2, 4)
    w = w0 + 0.2 * _rng_matrix(5, 3, 6, 2, 4)
    r = la.magnitude_direction(w0, w, layout=layout)
    assert r.delta_m.shape == (3,)
    for layer in range(3):
        dm, dd = _md_loops(w0[layer].reshape(6, 8), w[layer].reshape(6, 8))
        np.testing.assert_allclose(float(r.delta_m[layer]), dm, rtol=1e-5)
        np.testing.assert_allclose(float(r.delta_d[layer]), dd, rtol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(3, 6, 2, 4\).*needs layout"):
        la.magnitude_direction(w0, w)


def test_magnitude_direction_tree_full_fine_tuning():
    p0 = {"a": {"kernel": _rng_matrix(6, 5, 4)}, "b": {"kernel": _rng_matrix(7, 4, 3), "bias": np.zeros(3)}}
    p1 = jax.tree_util.tree_map(lambda x: x + 0.1 * np.ones_like(x), p0)
    out = la.magnitude_direction_tree(p0, p1, r".*/kernel")
    assert sorted(out) == ["a/kernel", "b/kernel"]
    for path in out:
        top, _ = path.split("/")
        dm, dd = _md_loops(p0[top]["kernel"], p1[top]["kernel"])
        np.testing.assert_allclose(float(out[path].delta_m), dm, rtol=1e-5)
        np.testing.assert_allclose(float(out[path].delta_d), dd, rtol=1e-5)
    assert list(la.magnitude_direction_tree(p0, p1, ["b/kernel"])) == ["b/kernel"]
    with pytest.raises(ValueError, match="match no path"):
        la.magnitude_direction_tree(p0, p1, "nope")
    with pytest.raises(ValueError, match=r"a/kernel: params0 has shape \(5, 4\) but params has \(4, 5\)"):
        la.magnitude_direction_tree(p0, {**p1, "a": {"kernel": np.zeros((4, 5))}}, "a/kernel")


STACKED_LAYOUTS = {"blocks/query/kernel": lj.Layout(in_axes=(0,), out_axes=(1, 2), stack=1),
                   "blocks/fc1/kernel": lj.Layout(stack=1)}


@pytest.fixture(scope="module")
def scanned():
    """Params of two nn.scan-stacked layers: a multi-axis (layers, d, heads, head_dim) and a Dense kernel."""
    params = {"blocks": {"query": {"kernel": _rng_matrix(15, 2, 16, 2, 6) / 4},
                         "fc1": {"kernel": _rng_matrix(16, 2, 16, 24) / 4, "bias": np.zeros((2, 24), np.float32)}},
              "head": {"kernel": _rng_matrix(17, 16, 4)}}
    return params, STACKED_LAYOUTS


def _kernel_at(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return np.asarray(tree)


@pytest.mark.parametrize("method", [
    lj.LoRA(rank=3, alpha=6.0, targets=TARGETS),
    lj.DoRA(rank=3, alpha=6.0, targets=TARGETS),
    lj.VeRA(rank=16, targets=TARGETS),
], ids=["lora", "dora", "vera"])
def test_adapter_magnitude_direction_and_spectra_per_layer(method, scanned):
    params, layouts = scanned
    frozen, adapter = lj.init(method, params, jax.random.key(2), layouts=layouts)
    adapter = randomize(adapter, seed=3, scale=0.2)
    merged = lj.merge(frozen, adapter)
    out = la.magnitude_direction_adapter(frozen, adapter)
    assert sorted(out) == sorted(STACKED_LAYOUTS)
    for path, r in out.items():
        layout = layouts[path]
        w0 = np.asarray(layout.to_matrix(jnp.asarray(_kernel_at(params, path))))
        w = np.asarray(layout.to_matrix(jnp.asarray(_kernel_at(merged, path))))
        assert r.delta_m.shape == (2,)
        for layer in range(2):
            dm, dd = _md_loops(w0[layer], w[layer])
            np.testing.assert_allclose(float(r.delta_m[layer]), dm, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(float(r.delta_d[layer]), dd, rtol=1e-4, atol=1e-7)

    spectra = la.update_spectra(adapter, frozen=frozen)
    # VeRA's projections, regenerated independently (max_in = 16, max_out = 24 over the targets)
    proj_a, proj_b = lj.vera_projections(16, 16, 24, seed=0) if isinstance(method, lj.VeRA) else (None, None)
    for path in STACKED_LAYOUTS:
        node = adapter
        for key in path.split("/"):
            node = node[key]
        s = spectra[path]
        n_in, n_out = node.layout.matrix_shape(node.shape)
        for layer in range(2):
            if isinstance(method, lj.VeRA):   # (Aᵀ ⊙ λ_d) @ (Bᵀ ⊙ λ_b), independent numpy reference
                at = proj_a.astype(np.float64)[:, :n_in].T * np.asarray(node.lambda_d[layer])[None]
                bt = proj_b.astype(np.float64)[:n_out].T * np.asarray(node.lambda_b[layer])[None]
                delta = at @ bt
            else:
                delta = method.scaling * np.asarray(node.a[layer], np.float64) @ np.asarray(node.b[layer], np.float64)
            want = np.linalg.svd(delta, compute_uv=False)[: s.shape[-1]]
            np.testing.assert_allclose(np.asarray(s[layer]), want, rtol=1e-5, atol=1e-5 * want[0])
            if isinstance(method, lj.LoRA):  # and the spectrum of what merge adds
                merged_delta = (np.asarray(layouts[path].to_matrix(jnp.asarray(_kernel_at(merged, path))), np.float64)
                                - np.asarray(layouts[path].to_matrix(jnp.asarray(_kernel_at(params, path)))))[layer]
                np.testing.assert_allclose(np.asarray(s[layer]), np.linalg.svd(merged_delta, compute_uv=False)[:3],
                                           rtol=1e-4)
    if isinstance(method, lj.VeRA):
        with pytest.raises(ValueError, match="needs frozen="):
            la.update_spectrum(adapter["blocks"]["fc1"]["kernel"])


def test_dora_magnitude_only_change_is_pure_delta_m():
    w0 = _rng_matrix(8, 6, 4)
    frozen, adapter = lj.init(lj.DoRA(rank=2, targets="k"), {"k": w0}, jax.random.key(0))
    node = adapter["k"]
    adapter = {"k": node.replace(m=node.m * 1.5)}             # B = 0: direction unchanged
    r = la.magnitude_direction_adapter(frozen, adapter)["k"]
    np.testing.assert_allclose(float(r.delta_m), 0.5 * np.mean(np.linalg.norm(w0, axis=0)), rtol=1e-5)
    assert float(r.delta_d) < 1e-7


def test_nf4_and_bf16_bases():
    w0 = _rng_matrix(18, 64, 32)
    # NF4: W0 is the dequantized base (= merge at init, where B = 0)
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets="k", quant=lj.NF4()), {"k": w0}, jax.random.key(0))
    base = np.asarray(lj.merge(frozen, adapter)["k"])
    assert np.abs(base - w0).max() > 1e-3                          # really quantized
    adapter = randomize(adapter, seed=7, scale=0.5)
    r = la.magnitude_direction_adapter(frozen, adapter)["k"]
    dm, dd = _md_loops(base, np.asarray(lj.merge(frozen, adapter)["k"]))
    np.testing.assert_allclose([float(r.delta_m), float(r.delta_d)], [dm, dd], rtol=1e-4)
    # bf16: ΔW is measured in float32, not rounded to the kernel's bf16
    w16 = jnp.asarray(w0, jnp.bfloat16)
    frozen, adapter = lj.init(lj.LoRA(rank=2, alpha=2.0, targets="k"), {"k": w16}, jax.random.key(0))
    adapter = randomize(adapter, seed=8, scale=1e-3)
    node = adapter["k"]
    w32 = np.asarray(w16, np.float64)
    r = la.magnitude_direction_adapter(frozen, adapter)["k"]
    dm, dd = _md_loops(w32, w32 + np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64))
    np.testing.assert_allclose([float(r.delta_m), float(r.delta_d)], [dm, dd], rtol=1e-3)


def test_pissa_needs_params0():
    w0 = _rng_matrix(9, 8, 6)
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets="k", init="pissa"), {"k": w0}, jax.random.key(0))
    with pytest.raises(ValueError, match="k: PiSSA keeps W0 − s·A@B"):
        la.magnitude_direction_adapter(frozen, adapter)
    r = la.magnitude_direction_adapter(frozen, adapter, params0={"k": w0})["k"]   # at init: W' = W0
    assert float(r.delta_m) < 1e-5 and float(r.delta_d) < 1e-6


# ------------------------------------------------------------------------------------ spectrum

def test_update_spectrum_of_factors_equals_numpy_svd():
    a, b = _rng_matrix(10, 20, 4), _rng_matrix(11, 4, 12)
    got = la.update_spectrum((a, b, 0.7))
    want = np.linalg.svd(0.7 * a.astype(np.float64) @ b.astype(np.float64), compute_uv=False)[:4]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # rank > out: min(in, out, r) values
    a, b = _rng_matrix(12, 9, 6), _rng_matrix(13, 6, 3)
    want = np.linalg.svd(a.astype(np.float64) @ b, compute_uv=False)
    np.testing.assert_allclose(np.asarray(la.update_spectrum((a, b))), want, rtol=1e-5)


# ------------------------------------------------------------------------- intruder dimensions

def _orthonormal(seed, n, p):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((n, p)))[0]


def _constructed(n_in=40, n_out=32):
    """W0 = U diag(s) Vᵀ with known orthonormal U (in, 32), V (out, 32), distinct s = 10 → 1."""
    u, v = _orthonormal(20, n_in, n_out), _orthonormal(21, n_out, n_out)
    s = np.linspace(10.0, 1.0, n_out)
    return u, s, v


@pytest.mark.parametrize("side", ["out", "in"])
def test_intruder_from_rank_one_update_orthogonal_to_top_k(side):
    u, s, v = _constructed()
    k, sigma = 5, 50.0
    c = np.zeros(32)
    c[16:] = 0.25                                          # unit vector spread over W0's bottom 16 directions
    w0 = (u * s) @ v.T
    a, b = (u @ c)[:, None], sigma * (v @ c)[None, :]      # ΔW = σ (Uc)(Vc)ᵀ = U (σ c cᵀ) Vᵀ
    r = la.intruder_dimensions(w0.astype(np.float32), update=(a.astype(np.float32), b.astype(np.float32)),
                               k=k, epsilon=0.5, side=side, solver="svd")
    # W = U (diag(s) + σ c cᵀ) Vᵀ: the top 16 directions are untouched, the bottom block's top
    # eigenvector e is the new top singular direction U e / V e, with max |cos| = max |e|.
    lam, vecs = np.linalg.eigh(np.diag(s[16:]) + sigma * np.outer(c[16:], c[16:]))
    assert int(r.count) == 1
    np.testing.assert_array_equal(np.asarray(r.is_intruder), [True, False, False, False, False])
    np.testing.assert_allclose(float(r.max_cos[0]), np.max(np.abs(vecs[:, -1])), atol=1e-4)
    np.testing.assert_allclose(np.asarray(r.max_cos[1:]), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(r.singular_values), [lam[-1], *s[:4]], rtol=1e-5)
    assert float(jnp.max(r.residual)) < 1e-4


def test_small_update_inside_w0_subspace_has_no_intruders():
    u, s, v = _constructed()
    k = 5
    w0 = (u * s) @ v.T
    delta = (u[:, :k] * np.array([0.1, 0.05, -0.1, 0.02, 0.03])) @ v[:, :k].T
    r = la.intruder_dimensions(w0.astype(np.float32), (w0 + delta).astype(np.float32), k=k, epsilon=0.5)
    assert int(r.count) == 0
    np.testing.assert_allclose(np.asarray(r.max_cos), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.singular_values), s[:k] + [0.1, 0.05, -0.1, 0.02, 0.03], rtol=1e-5)


def test_krylov_matches_full_svd_on_a_decaying_spectrum():
    n_in, n_out, rank = 160, 120, 4
    u, v = _orthonormal(30, n_in, n_out), _orthonormal(31, n_out, n_out)
    s = 10.0 * 0.9 ** np.arange(n_out)
    w0 = ((u * s) @ v.T).astype(np.float32)
    a, b = 0.3 * _rng_matrix(32, n_in, rank), 0.3 * _rng_matrix(33, rank, n_out)
    exact = la.intruder_dimensions(w0, update=(a, b, 2.0), k=8, epsilon=0.3, side="in", solver="svd")
    fast = la.intruder_dimensions(w0, update=(a, b, 2.0), k=8, epsilon=0.3, side="in", solver="krylov", depth=4)
    want_s = np.linalg.svd(w0.astype(np.float64) + 2.0 * a.astype(np.float64) @ b, compute_uv=False)[:8]
    np.testing.assert_allclose(np.asarray(exact.singular_values), want_s, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fast.singular_values), want_s, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fast.max_cos), np.asarray(exact.max_cos), atol=1e-3)
    assert int(fast.count) == int(exact.count)
    assert float(jnp.max(fast.residual)) < 1e-3


def test_intruders_per_layer_and_reused_w0_vectors():
    u, s, v = _constructed()
    w0 = np.stack([(u * s) @ v.T, (u * s[::-1]) @ v.T]).astype(np.float32)   # (2, in, out)
    c = np.zeros(32)
    c[16:] = 0.25
    a = np.stack([u @ c, u @ c])[:, :, None].astype(np.float32)
    b = np.stack([50.0 * (v @ c), 0.001 * (v @ c)])[:, None, :].astype(np.float32)
    layout = lj.Layout(stack=1)
    r = la.intruder_dimensions(w0, update=(a, b), k=3, layout=layout)
    np.testing.assert_array_equal(np.asarray(r.count), [1, 0])
    vecs = np.stack([v, v])                                  # W0's out-side singular vectors, known
    r2 = la.intruder_dimensions(w0, update=(a, b), k=3, layout=layout, w0_vectors=vecs)
    np.testing.assert_allclose(np.asarray(r2.max_cos), np.asarray(r.max_cos), atol=1e-5)


def test_intruder_dimensions_adapter_factored_equals_dense():
    w0 = _rng_matrix(40, 24, 16)
    params = {"lora": {"kernel": w0}, "dora": {"kernel": w0 + 1}, "vera": {"kernel": w0 - 1}}
    frozen, adapter = lj.init([lj.LoRA(rank=2, alpha=4.0, targets="lora/kernel"),
                               lj.DoRA(rank=2, alpha=4.0, targets="dora/kernel"),
                               lj.VeRA(rank=4, targets="vera/kernel")], params, jax.random.key(0))
    adapter = randomize(adapter, seed=6, scale=2.0)
    merged = lj.merge(frozen, adapter)
    out = la.intruder_dimensions_adapter(frozen, adapter, k=4, epsilon=0.6, solver="krylov")
    for path in ("lora/kernel", "dora/kernel", "vera/kernel"):
        top = path.split("/")[0]
        want = la.intruder_dimensions(params[top]["kernel"], merged[top]["kernel"], k=4, epsilon=0.6)
        np.testing.assert_allclose(np.asarray(out[path].singular_values), np.asarray(want.singular_values), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out[path].max_cos), np.asarray(want.max_cos), atol=1e-4)
        assert int(out[path].count) == int(want.count)


def test_intruder_errors_name_the_problem():
    w0 = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="exactly one of w"):
        la.intruder_dimensions(w0, k=2)
    with pytest.raises(ValueError, match=r"k=5 exceeds min\(in, out\) = 4"):
        la.intruder_dimensions(w0, w0, k=5)
    with pytest.raises(ValueError, match="side must be 'out'"):
        la.intruder_dimensions(w0, w0, k=2, side="left")
    _, dora = lj.init(lj.DoRA(rank=1, targets="k"), {"k": w0}, jax.random.key(0))
    with pytest.raises(TypeError, match="DoRA's tuned weight"):
        la.intruder_dimensions(w0, update=dora["k"], k=2)
    with pytest.raises(ValueError, match=r"factors must be A \(\.\.\., in, r\)"):
        la.intruder_dimensions(w0, update=(np.ones((4, 2)), np.ones((3, 4))), k=2)
