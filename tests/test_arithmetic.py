"""Adapter arithmetic against independent numpy (float64) references; TIES/DARE also against PEFT's own math."""

import importlib.util
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from conftest import BLOCK_TARGETS, TinyModel
from lowrank_jax import arithmetic as la

# q: 2-D; mlp: 2-D; stk: nn.scan stack of 3 multi-axis kernels, per layer (2, 6, 4) with in = axis 1 (6)
# and out = axes (0, 2) (2·4 = 8), so the (in, out) view needs a real transpose.
SHAPES = {"q": (12, 10), "mlp": (10, 14), "stk": (3, 2, 6, 4)}
STK = lj.Layout(in_axes=(1,), out_axes=(0, 2), stack=1)
LAYOUTS = {"stk/kernel": STK}


def _params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {name: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for name, s in shapes.items()}


def _rand(adapter, seed, scale=0.3):
    """Every adapter array replaced by seeded N(0, scale²) values (float32)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rng.normal(size=np.shape(x)) * scale, jnp.float32) for x in leaves])


def _init(method, params, seed):
    frozen, ad = lj.init(method, params, jax.random.key(seed), layouts=LAYOUTS)
    return frozen, _rand(ad, seed)


# ---- numpy float64 references: matrix view, (in, out) ↔ kernel, per-adapter ΔW

def np_to_matrix(path, w):
    w = np.asarray(w, np.float64)
    if path == "stk/kernel":                                   # (3, 2, 6, 4) → (3, 6, 2, 4) → (3, 6, 8)
        return w.transpose(0, 2, 1, 3).reshape(3, 6, 8)
    return w


def np_from_matrix(path, m):
    if path == "stk/kernel":
        return m.reshape(3, 6, 2, 4).transpose(0, 2, 1, 3)
    return m


def np_scaling(method):
    return method.alpha / (math.sqrt(method.rank) if method.rslora else method.rank)


def np_nodes(adapter):
    out = {}
    for name, sub in adapter.items():
        out[f"{name}/kernel"] = sub["kernel"]
    return out


def np_delta_matrix(node):
    """LoRA ΔW = s·A@B in float64, (*stack, in, out)."""
    return np_scaling(node.method) * (np.asarray(node["a"], np.float64) @ np.asarray(node["b"], np.float64))


def np_weighted(adapters, weights):
    """{path: Σ_k w_k ΔW_k} (kernel-shaped float64) over the union of targets."""
    out = {}
    for ad, w in zip(adapters, weights):
        for path, node in np_nodes(ad).items():
            d = np_from_matrix(path, w * np_delta_matrix(node))
            out[path] = out.get(path, 0.0) + d
    return out


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


def delta_of(adapter, path):
    """ΔW of a LoRA result node from its own factors, float64 (checks the construction, not f32 products)."""
    node = np_nodes(adapter)[path]
    return np_from_matrix(path, np_delta_matrix(node))


@pytest.fixture(scope="module")
def two():
    """Two LoRA adapters of one base: different ranks, alphas, rsLoRA, and overlapping targets."""
    params = _params()
    frozen, ad1 = _init(lj.LoRA(rank=2, alpha=4.0, targets=r"(q|stk)/kernel"), params, 1)
    _, ad2 = _init(lj.LoRA(rank=3, alpha=2.0, rslora=True, targets=r"(q|mlp)/kernel"), params, 2)
    return params, frozen, ad1, ad2


# ------------------------------------------------------------------------------ weighted_sum

def test_weighted_sum_equals_weighted_sum_of_deltas(two):
    params, frozen, ad1, ad2 = two
    w = [0.7, -1.3]
    combo = la.weighted_sum([ad1, ad2], w)
    ref = np_weighted([ad1, ad2], w)
    dense, merged = la.deltas(combo), lj.merge(frozen, combo)
    assert sorted(np_nodes(combo)) == ["mlp/kernel", "q/kernel", "stk/kernel"]   # the union of targets
    assert {p: n.method.rank for p, n in np_nodes(combo).items()} == {"q/kernel": 5, "mlp/kernel": 3,
                                                                      "stk/kernel": 2}
    for path, want in ref.items():
        node = np_nodes(combo)[path]
        assert node.layout == (STK if path == "stk/kernel" else lj.Layout())
        assert node.shape == tuple(np.shape(want)) and node.method.scaling == pytest.approx(1.0)
        assert re.fullmatch(node.method.targets[0], path)
        name = path.split("/")[0]
        assert rel(delta_of(combo, path), want) < 1e-6                  # the factors, in float64
        assert rel(dense[name]["kernel"], want) < 1e-6                  # float32 products
        assert rel(np.asarray(merged[name]["kernel"], np.float64) - np.asarray(params[name]["kernel"]), want) < 1e-5

    # The old PEFT way — A and B combined separately, (Σ w_k A_k)(Σ w_k B_k) — has cross terms k ≠ l.
    _, ad3 = _init(lj.LoRA(rank=2, alpha=4.0, targets="q/kernel"), params, 3)
    n1, n3 = ad1["q"]["kernel"], ad3["q"]["kernel"]
    naive = 2.0 * (0.5 * np.asarray(n1.a) + 0.5 * np.asarray(n3.a)) @ (0.5 * np.asarray(n1.b) + 0.5 * np.asarray(n3.b))
    want = np_weighted([ad1, ad3], [0.5, 0.5])["q/kernel"]
    assert rel(naive, want) > 0.1
    assert rel(delta_of(la.weighted_sum([ad1, ad3], [0.5, 0.5]), "q/kernel"), want) < 1e-6


def test_weighted_sum_on_an_nn_scan_model_equals_sum_of_merged_deltas():
    """Real nn.scan-stacked DenseGeneral kernels (layouts from lj.discover), ranks/targets differing."""
    model = TinyModel(scan=True)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    variables = model.init(jax.random.key(1), x)
    layouts = lj.discover(model, variables, x)
    params = variables["params"]
    frozen, ad1 = lj.init(lj.LoRA(rank=2, alpha=4.0, targets=BLOCK_TARGETS), params, jax.random.key(2), layouts=layouts)
    _, ad2 = lj.init(lj.LoRA(rank=3, targets=r"(blocks/attn/.*|head)/kernel"), params, jax.random.key(3), layouts=layouts)
    ad1, ad2 = _rand(ad1, 2, 0.1), _rand(ad2, 3, 0.1)
    nodes = jax.tree_util.tree_leaves(ad1, is_leaf=lambda v: isinstance(v, lj.AdapterParams))
    assert any(n.layout.stack == 1 and len(n.layout.out_axes) == 2 for n in nodes)   # scanned DenseGeneral
    w = [0.6, -1.1]
    merged = jax.tree_util.tree_leaves(lj.merge(frozen, la.weighted_sum([ad1, ad2], w)))
    base = jax.tree_util.tree_leaves(params)
    d1, d2 = (jax.tree_util.tree_leaves(lj.merge(frozen, ad)) for ad in (ad1, ad2))
    for m, b0, x1, x2 in zip(merged, base, d1, d2):
        b0 = np.asarray(b0, np.float64)
        want = w[0] * (np.asarray(x1, np.float64) - b0) + w[1] * (np.asarray(x2, np.float64) - b0)
        if np.any(want):
            assert rel(np.asarray(m, np.float64) - b0, want) < 1e-5


def test_weighted_sum_carries_explicit_alpha_and_rslora(two):
    _, _, ad1, ad2 = two
    combo = la.weighted_sum([ad1, ad2], [1.0, 2.0], alpha=10.0, rslora=True)
    node = combo["q"]["kernel"]
    assert node.method.rslora and node.method.scaling == pytest.approx(10.0 / math.sqrt(5))
    assert rel(delta_of(combo, "q/kernel"), np_weighted([ad1, ad2], [1.0, 2.0])["q/kernel"]) < 1e-6


# -------------------------------------------------------------------------------------- truncate

def test_truncate_reports_discarded_spectrum(two):
    _, _, ad1, ad2 = two
    w = [0.7, -1.3]
    combo = la.weighted_sum([ad1, ad2], w)
    low, report = la.truncate(combo, 2)
    ref = np_weighted([ad1, ad2], w)
    for path, want in ref.items():
        m = np_to_matrix(path, want)                                     # (*stack, in, out), float64
        u, sv, vh = np.linalg.svd(m, full_matrices=False)
        r = np_nodes(combo)[path].method.rank
        k = min(2, r)
        spec = report[path]
        top = float(np.max(sv))
        np.testing.assert_allclose(spec.kept, sv[..., :k], atol=1e-5 * top)
        np.testing.assert_allclose(spec.discarded, sv[..., k:r], atol=1e-5 * top)
        frac = np.sqrt(np.sum(sv[..., k:] ** 2, axis=-1) / np.sum(sv ** 2, axis=-1))
        np.testing.assert_allclose(spec.rel_error, frac, atol=1e-5)
        best = np_from_matrix(path, (u[..., :, :k] * sv[..., None, :k]) @ vh[..., :k, :])   # Eckart–Young
        assert np_nodes(low)[path].method.rank == k
        assert rel(delta_of(low, path), best) < 1e-5
        got_err = np.linalg.norm(np_to_matrix(path, delta_of(low, path)) - m, axis=(-2, -1)) / \
            np.linalg.norm(m, axis=(-2, -1))
        np.testing.assert_allclose(spec.rel_error, got_err, atol=1e-5)
    assert report["q/kernel"].discarded.shape == (3,) and report["stk/kernel"].discarded.shape == (3, 0)
    assert report["q/kernel"].max_rel_error > 0.05

    # weighted_sum(..., rank=k) does both
    low2, report2 = la.weighted_sum([ad1, ad2], w, rank=2)
    for path in ref:
        assert rel(delta_of(low2, path), delta_of(low, path)) < 1e-6
        np.testing.assert_allclose(report2[path].discarded, report[path].discarded, rtol=1e-6)


def test_truncate_never_decomposes_the_full_matrix():
    params = {"big": {"kernel": jnp.zeros((96, 80), jnp.float32)}}
    _, ad = _init(lj.LoRA(rank=6), params, 0)
    eqns = _all_eqns(jax.make_jaxpr(lambda a: jax.tree_util.tree_leaves(la.truncate(a, 3)[0]))(ad).jaxpr)
    svd_inputs = [tuple(v.aval.shape) for e in eqns if e.primitive.name == "svd" for v in e.invars]
    assert svd_inputs == [(6, 6)]                                      # only the r×r core
    assert not any(tuple(getattr(v.aval, "shape", ())) == (96, 80) for e in eqns for v in e.outvars)


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, custom_jvp, ...)."""
    out = []
    for e in jaxpr.eqns:
        out.append(e)
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out.extend(_all_eqns(inner))
    return out


# -------------------------------------------------------------------------------- TIES / DARE

def np_ties(taus, weights, density, majority="total"):
    """Independent TIES on float64 kernels (K, *stack, in, out): trim per layer, elect, disjoint mean."""
    taus = np.asarray(taus, np.float64)
    flat = taus.reshape(taus.shape[0], -1, taus.shape[-2] * taus.shape[-1])
    n = flat.shape[-1]
    keep = int(density * n)
    trimmed = np.zeros_like(flat)
    for k in range(flat.shape[0]):
        for layer in range(flat.shape[1]):
            order = np.argsort(-np.abs(flat[k, layer]), kind="stable")[:keep]
            trimmed[k, layer, order] = flat[k, layer, order]
    trimmed = trimmed.reshape(taus.shape)
    votes = trimmed.sum(0) if majority == "total" else np.sign(trimmed).sum(0)
    gamma = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == gamma
    w = np.asarray(weights).reshape((-1,) + (1,) * (taus.ndim - 1))
    return (w * trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)


def np_stacked_taus(adapters, path):
    """(K', *stack, in, out) float64 ΔW of the adapters that target path, and their indices."""
    ks = [k for k, ad in enumerate(adapters) if path in np_nodes(ad)]
    return np.stack([np_delta_matrix(np_nodes(adapters[k])[path]) for k in ks]), ks


@pytest.fixture(scope="module")
def three(two):
    params, frozen, ad1, ad2 = two
    _, ad3 = _init(lj.LoRA(rank=4, alpha=8.0, targets=r"(q|mlp|stk)/kernel"), params, 3)
    return params, [ad1, ad2, ad3], [0.5, 1.5, -0.8]


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_against_numpy(three, majority):
    _, ads, w = three
    got = la.ties(ads, w, density=0.3, majority_sign=majority)
    for path in ["q/kernel", "mlp/kernel", "stk/kernel"]:
        taus, ks = np_stacked_taus(ads, path)
        want = np_from_matrix(path, np_ties(taus, [w[k] for k in ks], 0.3, majority))
        assert rel(got[path.split("/")[0]]["kernel"], want) < 1e-5, path
    full = la.ties(ads, w, density=1.0)                                # no trimming: still sign + disjoint
    taus, ks = np_stacked_taus(ads, "q/kernel")
    assert rel(full["q"]["kernel"], np_ties(taus, [w[k] for k in ks], 1.0)) < 1e-5


def _peft_merge_utils():
    """PEFT's merge_utils.py loaded on its own (it needs only torch), or skip."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        pytest.skip("peft not installed")
    path = pathlib.Path(spec.origin).parent / "utils" / "merge_utils.py"
    mod_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return torch, mod


@pytest.mark.filterwarnings("ignore:The density 1.0")
def test_ties_and_dare_match_peft_merge_utils(three):
    torch, mu = _peft_merge_utils()
    _, ads, w = three
    taus, ks = np_stacked_taus(ads, "mlp/kernel")                       # PEFT: one torch module = one matrix
    wk = [w[k] for k in ks]
    tt = [torch.tensor(t.T.astype(np.float32)) for t in taus]           # torch (out, in) = ΔWᵀ
    want = mu.ties(tt, torch.tensor(wk), density=0.3).numpy().T
    assert rel(la.ties(ads, w, density=0.3)["mlp"]["kernel"], want) < 1e-5
    # dare with nothing dropped = PEFT dare_linear / dare_ties at density 1 (their masks are torch's RNG)
    np.testing.assert_allclose(la.dare(ads, w, p=0.0, key=jax.random.key(0))["mlp"]["kernel"],
                               mu.dare_linear(tt, torch.tensor(wk), density=1.0).numpy().T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        la.dare(ads, w, p=0.0, key=jax.random.key(0), combine="ties")["mlp"]["kernel"],
        mu.dare_ties(tt, torch.tensor(wk), density=1.0).numpy().T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_against_numpy(three, combine):
    _, ads, w = three
    key = jax.random.key(42)
    p = 0.6
    got = la.dare(ads, w, p=p, key=key, combine=combine)
    for path in ["q/kernel", "stk/kernel"]:
        taus, ks = np_stacked_taus(ads, path)
        shape = np_nodes(ads[ks[0]])[path].shape
        # masks by the documented derivation, drawn in kernel shape
        masks = np.stack([np_to_matrix(path, np.asarray(jax.random.bernoulli(la.dare_key(key, k, path), 1 - p, shape)))
                          for k in ks]).astype(bool)
        kept = np.where(masks, taus / (1 - p), 0.0)
        wk = np.asarray([w[k] for k in ks]).reshape((-1,) + (1,) * (taus.ndim - 1))
        if combine == "linear":
            want = (wk * kept).sum(0)
        else:
            want = np_ties(kept, [w[k] for k in ks], 1.0)
        assert rel(got[path.split("/")[0]]["kernel"], np_from_matrix(path, want)) < 1e-5, path
        assert 0.25 < masks.mean() < 0.55                                  # ≈ 1 − p survive


def test_dare_is_unbiased_and_p0_is_linear(three):
    _, ads, w = three
    lin = la.linear(ads, w)["q"]["kernel"]
    assert rel(la.dare(ads, w, p=0.0, key=jax.random.key(0))["q"]["kernel"], lin) < 1e-6
    mean = sum(la.dare(ads, w, p=0.5, key=jax.random.key(s))["q"]["kernel"] for s in range(40)) / 40
    # E[DARE] = linear: the sample mean of 40 draws is ~sqrt(40) times closer than one draw
    assert rel(mean, lin) < 0.5
    assert rel(mean, lin) < rel(la.dare(ads, w, p=0.5, key=jax.random.key(0))["q"]["kernel"], lin) / 2
    taus, _ = np_stacked_taus(ads, "q/kernel")
    keep1 = np.asarray(jax.random.bernoulli(la.dare_key(jax.random.key(7), 0, "q/kernel"), 0.5, (12, 10)))
    assert keep1.any() and not keep1.all()
    # adapter k's mask depends only on (key, k, path): alone or with the others, adapter 0 drops the same entries
    alone = la.dare(ads[:1], w[:1], p=0.5, key=jax.random.key(7))["q"]["kernel"]
    assert rel(alone, np.where(keep1, 2 * w[0] * taus[0], 0.0)) < 1e-6
    together = la.dare(ads, [w[0], 0.0, 0.0], p=0.5, key=jax.random.key(7))["q"]["kernel"]
    assert rel(together, alone) < 1e-6


# ----------------------------------------------------------------------------- factorize / dense

def test_factorize_ties_result_reports_spectrum(three):
    params, ads, w = three
    dense = la.ties(ads, w, density=0.5)
    low, report = la.factorize(dense, 3, like=ads)
    for path in ["q/kernel", "mlp/kernel", "stk/kernel"]:
        m = np_to_matrix(path, dense[path.split("/")[0]]["kernel"])
        u, sv, vh = np.linalg.svd(m, full_matrices=False)
        top = float(np.max(sv))
        np.testing.assert_allclose(report[path].kept, sv[..., :3], atol=1e-5 * top)
        np.testing.assert_allclose(report[path].discarded, sv[..., 3:], atol=1e-5 * top)
        best = np_from_matrix(path, (u[..., :, :3] * sv[..., None, :3]) @ vh[..., :3, :])
        assert rel(delta_of(low, path), best) < 1e-5
        assert np_nodes(low)[path].layout == np_nodes(ads[2])[path].layout
    eff = la.add_delta(params, dense)
    for name in ["q", "stk"]:
        assert rel(np.asarray(eff[name]["kernel"], np.float64) - np.asarray(params[name]["kernel"]),
                   dense[name]["kernel"]) < 1e-5


def test_dora_and_vera_dense_deltas_match_merge():
    params = _params(5)
    frozen_d, dora = _init(lj.DoRA(rank=2, targets=r"(q|stk)/kernel"), params, 5)
    dora = {name: {"kernel": dora[name]["kernel"].replace(                # m near ‖W0‖_col (a sane DoRA)
        m=jnp.asarray(1.1 * np.linalg.norm(np_to_matrix(f"{name}/kernel", params[name]["kernel"]), axis=-2),
                      jnp.float32))} for name in ["q", "stk"]}
    frozen_v, vera = _init(lj.VeRA(rank=4, targets=r"(mlp|stk)/kernel"), params, 6)
    for frozen, ad in [(frozen_d, dora), (frozen_v, vera)]:
        eff = la.add_delta(frozen, la.deltas(ad, frozen))
        merged = lj.merge(frozen, ad)
        for name in ad:
            assert rel(eff[name]["kernel"], merged[name]["kernel"]) < 1e-6
    # VeRA as exact LoRA factors, then combined with LoRA in factored form
    as_l = la.as_lora(vera, frozen_v)
    assert all(isinstance(n.method, lj.LoRA) for n in np_nodes(as_l).values())
    merged = lj.merge(params, as_l)
    for name in ["mlp", "stk"]:
        assert rel(merged[name]["kernel"], lj.merge(frozen_v, vera)[name]["kernel"]) < 1e-6
    _, lora = _init(lj.LoRA(rank=2, targets="mlp/kernel"), params, 7)
    combo = la.weighted_sum([as_l, lora], [0.5, 2.0])
    lin = la.linear([vera, lora], [0.5, 2.0], frozen=[frozen_v, None])
    assert rel(la.deltas(combo)["mlp"]["kernel"], lin["mlp"]["kernel"]) < 1e-5
    # DoRA's effective updates combine densely (linear equals the sum of merged deltas)
    lin = la.linear([dora, lora], [1.0, -1.0], frozen=params)
    want = (np.asarray(lj.merge(frozen_d, dora)["q"]["kernel"], np.float64) - np.asarray(params["q"]["kernel"]))
    assert rel(lin["q"]["kernel"], want) < 1e-5


# --------------------------------------------------------------------------------------- unmerge

def test_unmerge_round_trips_lora_vera_dora():
    params = _params(8)
    frozen, lora = _init(lj.LoRA(rank=3, alpha=6.0, targets=r".*kernel"), params, 8)
    back = la.unmerge(lj.merge(frozen, lora), lora)
    for name in SHAPES:
        assert rel(back[name]["kernel"], params[name]["kernel"]) < 1e-6

    frozen_v, vera = _init(lj.VeRA(rank=8, targets=r"(q|stk)/kernel"), params, 9)
    back = la.unmerge(lj.merge(frozen_v, vera), vera, frozen_like=frozen_v)
    for name in ["q", "stk"]:
        assert rel(back[name]["kernel"], params[name]["kernel"]) < 1e-6
    with pytest.raises(ValueError, match=r"q/kernel: VeRA needs its shared projections 'vera_0'"):
        la.unmerge(lj.merge(frozen_v, vera), vera)

    frozen_d, dora = _init(lj.DoRA(rank=2, targets=r"(mlp|stk)/kernel"), params, 10)
    dora = _rand(dora, 10, scale=0.2)
    merged = lj.merge(frozen_d, dora)
    with pytest.raises(ValueError, match=r"mlp/kernel: DoRA cannot be unmerged.*loses its norm.*dora_base_norms"):
        la.unmerge(merged, dora)
    norms = {f"{n}/kernel": np.linalg.norm(np_to_matrix(f"{n}/kernel", params[n]["kernel"]), axis=-2)
             for n in ["mlp", "stk"]}
    back = la.unmerge(merged, dora, dora_base_norms=norms)
    for name in ["mlp", "stk"]:
        assert rel(back[name]["kernel"], params[name]["kernel"]) < 1e-5
    big = {"mlp": {"kernel": dora["mlp"]["kernel"].replace(b=dora["mlp"]["kernel"].b * 100.0)}}
    with pytest.raises(ValueError, match=r"mlp/kernel: DoRA column\(s\) .* ‖s·A@B‖_j ≥ ‖W0_j‖.*not identifiable"):
        la.unmerge(lj.merge(params, big), big, dora_base_norms=norms)


# ------------------------------------------------------------------------------------------ PEFT

def test_peft_loaded_adapters_combine_like_our_own(tmp_path):
    params = {k: v for k, v in _params(11).items() if k != "stk"}
    _, ad1 = lj.init([lj.LoRA(rank=2, alpha=4.0, targets="q/kernel"), lj.LoRA(rank=3, alpha=3.0, targets="mlp/kernel")],
                     params, jax.random.key(1))
    _, ad2 = lj.init(lj.LoRA(rank=4, alpha=16.0, rslora=True, targets="q/kernel"), params, jax.random.key(2))
    ad1, ad2 = _rand(ad1, 1), _rand(ad2, 2)
    loaded = []
    for i, ad in enumerate([ad1, ad2]):
        lj.io.peft.save(tmp_path / f"a{i}", ad)
        loaded.append(lj.io.peft.load(tmp_path / f"a{i}", params)[1])
    w = [1.5, -0.25]
    ref = np_weighted([ad1, ad2], w)
    combo = la.weighted_sum(loaded, w)
    for path, want in ref.items():
        assert rel(delta_of(combo, path), want) < 1e-6
        assert rel(la.deltas(combo)[path.split("/")[0]]["kernel"], want) < 1e-6
    mixed = la.weighted_sum([loaded[0], ad2], w)                          # loaded and own, together
    assert rel(delta_of(mixed, "q/kernel"), ref["q/kernel"]) < 1e-6


# ---------------------------------------------------------------------------------------- errors

def test_errors_name_path_and_value(two):
    params, frozen, ad1, ad2 = two
    other = {**_params(), "q": {"kernel": jnp.zeros((12, 11), jnp.float32)}}
    _, ad_other = lj.init(lj.LoRA(rank=2, targets="q/kernel"), other, jax.random.key(0))
    with pytest.raises(ValueError, match=r"q/kernel: adapters\[0\] was made for a kernel of shape \(12, 10\) but "
                                         r"adapters\[1\] for a kernel of shape \(12, 11\).*one frozen base"):
        la.weighted_sum([ad1, ad_other], [1.0, 1.0])
    relaid = {"stk": {"kernel": lj.AdapterParams(
        {"a": jnp.zeros((2, 3, 2)), "b": jnp.zeros((2, 2, 24))}, lj.LoRA(rank=2), lj.Layout(in_axes=(0,), out_axes=(1, 2), stack=1),
        (3, 2, 6, 4), "float32")}}
    with pytest.raises(ValueError, match=r"stk/kernel: adapters\[0\] was made for the kernel layout .* but adapters\[1\]"):
        la.ties([ad1, relaid], [1.0, 1.0], density=0.5)
    _, dora = lj.init(lj.DoRA(rank=2, targets="q/kernel"), params, jax.random.key(0))
    with pytest.raises(TypeError, match=r"weighted_sum: q/kernel: adapters\[1\] uses DoRA .*not additive"):
        la.weighted_sum([ad1, dora], [1.0, 1.0])
    frozen_v, vera = lj.init(lj.VeRA(rank=4, targets="mlp/kernel"), params, jax.random.key(0))
    with pytest.raises(TypeError, match=r"weighted_sum: mlp/kernel: adapters\[0\] uses VeRA .*as_lora\(adapter, frozen\)"):
        la.weighted_sum([vera, ad2], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"truncate: q/kernel: the adapter uses DoRA"):
        la.truncate(dora, 1)
    with pytest.raises(ValueError, match=r"weighted_sum: got 3 weights for 2 adapters"):
        la.weighted_sum([ad1, ad2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"weights\[1\] = nan is not finite"):
        la.weighted_sum([ad1, ad2], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"ties: weights\[0\] = inf is not finite"):
        la.ties([ad1, ad2], [np.inf, 1.0], density=0.5)
    with pytest.raises(TypeError, match=r"weights\[1\] = 'x' is not a concrete real number"):
        la.linear([ad1, ad2], [1.0, "x"])
    with pytest.raises(TypeError, match=r"expected a non-empty list of adapters"):
        la.weighted_sum(ad1, [1.0])
    with pytest.raises(ValueError, match=r"truncate: rank must be an integer >= 1, got 0"):
        la.truncate(ad1, 0)
    with pytest.raises(ValueError, match=r"ties: density must be a number in \(0, 1\].*got 1.5"):
        la.ties([ad1], [1.0], density=1.5)
    with pytest.raises(ValueError, match=r"dare: p \(the drop probability\) must be a number in \[0, 1\), got 1.0"):
        la.dare([ad1], [1.0], p=1.0, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"dare: key must be an explicit jax.random key"):
        la.dare([ad1], [1.0], p=0.5, key=None)
    with pytest.raises(ValueError, match=r"q/kernel: DoRA needs the frozen tree to form ΔW.*pass frozen="):
        la.linear([dora], [1.0])
    with pytest.raises(ValueError, match=r"factorize: mlp/kernel is in the delta but in none of the `like` adapters"):
        la.factorize(la.linear([ad2], [1.0]), 2, like=ad1)
    with pytest.raises(ValueError, match=r"add_delta: q/kernel: the frozen kernel has shape \(12, 11\) but the delta has "
                                         r"shape \(12, 10\)"):
        la.add_delta(other, la.deltas(ad1))
    with pytest.raises(ValueError, match=r"unmerge: q/kernel: the merged kernel has shape \(12, 11\) but the adapter"):
        la.unmerge(other, ad1)
    _, pissa = lj.init(lj.LoRA(rank=2, init="pissa", targets="q/kernel"), params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"q/kernel: PiSSA adapters replace the frozen kernel"):
        la.weighted_sum([pissa, ad1], [1.0, 1.0])
