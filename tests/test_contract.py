"""The method contract: every method (one row of ``ROWS``) through every invariant that applies.

A new method is one new row. Each row builds a method for a targets regex and, optionally, a frozen
base (``quantize`` of the whole model) before ``init``. Invariants:

* ``merge(*init(...))`` is the identity on the (stored) base — bitwise, except PiSSA (float rounding);
* linen factored ``apply`` == ``model.apply`` on ``merge`` (outputs and adapter gradients, 1e-5);
* NNX factored ``apply`` == the merged model (outputs and adapter gradients, 1e-5);
* a bf16 base keeps bf16 outputs (and ``merge`` keeps bf16 kernels);
* adapter files round-trip bitwise; PEFT files round-trip (methods PEFT has);
* sharding specs exist for every array and follow the array's declared roles;
* a jitted step is traced once for a second adapter of the same structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax.execution import nnx as lnx
from conftest import BLOCK_TARGETS, TinyModel, randomize, rel_err

QV = r"blocks/attn/(query|value)/kernel"
NF4_SMALL = lj.NF4(block_size=32)


@dataclasses.dataclass(frozen=True)
class Row:
    make: Callable[[str], Any]                 # targets regex -> method
    base: Callable[[Any, Any], Any] | None = None   # (params, layouts) -> frozen base before init
    targets: str = BLOCK_TARGETS               # linen targets (TinyModel)
    nnx_targets: str = r".*kernel"
    exact_init: bool = True                    # merge at init bitwise equal to the stored base
    peft: bool = True                          # PEFT has this method


def _whole_base(params, layouts):
    return lj.quantize(params, NF4_SMALL, layouts=layouts)


ROWS = {
    "lora": Row(lambda t: lj.LoRA(rank=2, alpha=4.0, targets=t)),
    "rslora": Row(lambda t: lj.LoRA(rank=2, alpha=4.0, targets=t, rslora=True)),
    "lora_pissa": Row(lambda t: lj.LoRA(rank=2, alpha=4.0, targets=t, init="pissa"), exact_init=False, peft=False),
    "dora": Row(lambda t: lj.DoRA(rank=2, alpha=4.0, targets=t, detach_norm=False)),
    "dora_detached": Row(lambda t: lj.DoRA(rank=2, alpha=4.0, targets=t)),
    # the backward reads the pre-scale output back from the named scaled output (remat policies)
    "dora_output_name": Row(lambda t: lj.DoRA(rank=2, alpha=4.0, targets=t, detach_norm=False, output_name="out")),
    "vera": Row(lambda t: lj.VeRA(rank=8, targets=t)),
    "dvora": Row(lambda t: lj.DVoRA(rank=8, targets=t), peft=False),
    "dvora_output_name": Row(lambda t: lj.DVoRA(rank=8, targets=t, detach_norm=False, output_name="out"), peft=False),
    "qlora": Row(lambda t: lj.LoRA(rank=2, alpha=4.0, targets=t, quant=NF4_SMALL)),
    "qdora": Row(lambda t: lj.DoRA(rank=2, alpha=4.0, targets=t, quant=NF4_SMALL)),
    "lora_qv_on_nf4_base": Row(lambda t: lj.LoRA(rank=2, alpha=4.0, targets=t), base=_whole_base, targets=QV,
                               nnx_targets=r"(lin|stack/layers/lin)/kernel"),
}


# ------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def linen_model():
    model = TinyModel(scan=True)
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    variables = model.init(jax.random.key(1), x)
    return model, variables["params"], lj.discover(model, variables, x), x


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(16, 16, rngs=rngs)
        self.gen = nnx.LinearGeneral(16, (2, 8), rngs=rngs)

    def __call__(self, x):
        return x + nnx.gelu(self.lin(x)) + 0.5 * self.gen(x).reshape(x.shape)


class Stack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Layer(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(8, 16, rngs=rngs)
        self.lin = nnx.Linear(16, 16, rngs=rngs)
        self.stack = Stack(rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(self.stack(nnx.relu(self.lin(self.embed(x)))))


@pytest.fixture(scope="module")
def nnx_model():
    model = NNXModel(nnx.Rngs(0))
    return model, lnx.params_of(model), lnx.discover(model), jax.random.normal(jax.random.key(1), (2, 5, 8))


def _setup(row: Row, params, layouts, targets, seed=3, dtype=None):
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda v: v.astype(dtype), params)
    base = row.base(params, layouts) if row.base else params
    frozen, adapter = lj.init(row.make(targets), base, jax.random.key(seed), layouts=layouts)
    return base, frozen, adapter


def _assert_close_trees(a, b, tol):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        assert float(jnp.max(jnp.abs(y))) > 0, jax.tree_util.keystr(p)
        assert rel_err(x, y) < tol, (jax.tree_util.keystr(p), rel_err(x, y))


# --------------------------------------------------------------------------------- invariants

@pytest.mark.parametrize("name", ROWS)
def test_merge_at_init_is_the_stored_base(name, linen_model):
    row = ROWS[name]
    model, params, layouts, x = linen_model
    base, frozen, adapter = _setup(row, params, layouts, row.targets)
    # the reference: the base as stored (NF4 kernels dequantized); for the quant= shorthand, the
    # method's targets quantized
    quant = getattr(row.make(row.targets), "quant", None)
    if quant is not None:
        base = lj.quantize(params, dataclasses.replace(quant, targets=row.targets), layouts=layouts)
    base = lj.merge(base, {})
    merged = lj.merge(frozen, adapter)
    for (p, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(merged)[0],
                              jax.tree_util.tree_flatten_with_path(base)[0]):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(p)
        if row.exact_init:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("name", ROWS)
def test_reads_base_at_init_is_truthful(name):
    """``reads_base_at_init = False``: ``init_matrix`` on a ``ShapeDtypeStruct`` gives bitwise the arrays it
    gives on the real ``W0`` and there is no per-kernel cache (``init`` then skips NF4 dequantization).
    ``True``: the init arrays, the new base or the cache change with ``W0`` (the flag is not idle)."""
    m = ROWS[name].make(r".*")
    n_in, n_out = 12, 10
    shared = m.make_shared(n_in, n_out)
    w = jax.random.normal(jax.random.key(0), (n_in, n_out))
    key = jax.random.key(1)
    params, w_new = m.init_matrix(key, w, shared)
    if not m.reads_base_at_init:
        got, got_new = m.init_matrix(key, jax.ShapeDtypeStruct((n_in, n_out), jnp.float32), shared)
        assert w_new is None and got_new is None
        assert m.frozen_cache(jax.ShapeDtypeStruct((n_in, n_out), jnp.float32)) is None
        assert sorted(got) == sorted(params)
        for k in params:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(params[k]), err_msg=k)
    else:
        w2 = 2.0 * w + 1.0
        params2, w_new2 = m.init_matrix(key, w2, shared)
        seen = [params, w_new, m.frozen_cache(w)]
        seen2 = [params2, w_new2, m.frozen_cache(w2)]
        leaves, leaves2 = jax.tree_util.tree_leaves(seen), jax.tree_util.tree_leaves(seen2)
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, leaves2))


def test_init_dequantizes_an_nf4_base_only_for_methods_that_read_it(linen_model, monkeypatch):
    model, params, layouts, x = linen_model
    calls = []
    real = lj.nf4.dequantize

    def counting(q, *a, **k):
        calls.append(q.shape)
        return real(q, *a, **k)

    monkeypatch.setattr(lj.nf4, "dequantize", counting)
    lj.init(ROWS["qlora"].make(r"head/kernel"), params, jax.random.key(0), layouts=layouts)
    assert calls == []
    lj.init(ROWS["qdora"].make(r"head/kernel"), params, jax.random.key(0), layouts=layouts)
    assert len(calls) == 1


@pytest.mark.parametrize("name", ROWS)
def test_linen_factored_equals_merge_outputs_and_gradients(name, linen_model):
    row = ROWS[name]
    model, params, layouts, x = linen_model
    _, frozen, adapter = _setup(row, params, layouts, row.targets)
    adapter = randomize(adapter, scale=0.3)
    r = jax.random.normal(jax.random.key(9), model.apply({"params": lj.merge(frozen, adapter)}, x).shape)

    def factored(ad):
        y = lj.apply(model, {"params": frozen}, ad, x)
        return jnp.sum(y * r), y

    def merged(ad):
        y = model.apply({"params": lj.merge(frozen, ad)}, x)
        return jnp.sum(y * r), y

    (_, y_f), g_f = jax.jit(jax.value_and_grad(factored, has_aux=True))(adapter)
    (_, y_m), g_m = jax.jit(jax.value_and_grad(merged, has_aux=True))(adapter)
    assert rel_err(y_f, y_m) < 1e-5
    _assert_close_trees(g_f, g_m, 1e-5 if "dora" not in name else 2e-5)


def _nnx_merged(model, params, x):
    clone = nnx.clone(model)
    state = nnx.state(clone, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(clone, state)
    return clone(x)


@pytest.mark.parametrize("name", ROWS)
def test_nnx_factored_equals_merge_outputs_and_gradients(name, nnx_model):
    row = ROWS[name]
    model, params, layouts, x = nnx_model
    _, frozen, adapter = _setup(row, params, layouts, row.nnx_targets)
    adapter = randomize(adapter, scale=0.3)
    r = jax.random.normal(jax.random.key(9), (2, 5, 4))

    def factored(ad):
        y = lnx.apply(model, frozen, ad, x)
        return jnp.sum(y * r), y

    def merged(ad):
        y = _nnx_merged(model, lj.merge(frozen, ad), x)
        return jnp.sum(y * r), y

    (_, y_f), g_f = jax.jit(jax.value_and_grad(factored, has_aux=True))(adapter)
    (_, y_m), g_m = jax.jit(jax.value_and_grad(merged, has_aux=True))(adapter)
    assert rel_err(y_f, y_m) < 1e-5
    _assert_close_trees(g_f, g_m, 1e-5 if "dora" not in name else 2e-5)


@pytest.mark.parametrize("name", ROWS)
def test_bf16_base_keeps_bf16_outputs(name, linen_model):
    row = ROWS[name]
    model, params, layouts, x = linen_model
    _, frozen, adapter = _setup(row, params, layouts, row.targets, dtype=jnp.bfloat16)
    y = jax.jit(lambda ad: lj.apply(model, {"params": frozen}, ad, x.astype(jnp.bfloat16)))(randomize(adapter))
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree_util.tree_leaves(lj.merge(frozen, adapter)))
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(adapter))


@pytest.mark.parametrize("name", ROWS)
def test_adapter_file_round_trip_is_bitwise(name, linen_model, tmp_path):
    row = ROWS[name]
    model, params, layouts, x = linen_model
    _, frozen, adapter = _setup(row, params, layouts, row.targets)
    adapter = randomize(adapter)
    lj.save_adapter(tmp_path / "a", adapter)
    back = lj.load_adapter(tmp_path / "a", frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(adapter)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(adapter)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", [n for n, r in ROWS.items() if r.peft])
def test_peft_round_trip(name, linen_model, tmp_path):
    row = ROWS[name]
    model, params, layouts, x = linen_model
    base, frozen, adapter = _setup(row, params, layouts, row.targets)
    adapter = randomize(adapter)
    def name_map(path):          # one torch module per scanned layer
        *mods, leaf = path.split("/")
        leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
        if mods and mods[0] == "blocks":
            return [".".join(["blocks", str(i)] + mods[1:] + [leaf]) for i in range(2)]
        return ".".join(mods + [leaf])

    lj.io.peft.save(tmp_path / "p", adapter, frozen, name_map=name_map)
    frozen2, adapter2 = lj.io.peft.load(tmp_path / "p", lj.base_params(frozen), name_map=name_map, layouts=layouts)
    for (p, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(lj.merge(frozen2, adapter2))[0],
                              jax.tree_util.tree_flatten_with_path(lj.merge(frozen, adapter))[0]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("name", ROWS)
def test_sharding_specs_follow_declared_roles(name, linen_model):
    row = ROWS[name]
    model, params, layouts, x = linen_model
    _, frozen, adapter = _setup(row, params, layouts, row.targets)
    specs = {}
    for path, node in lj.tree.adapter_nodes(adapter):
        lay = node.layout
        entries = ["s"] * lay.stack + [None] * (lay.ndim - lay.stack)
        for k, a in enumerate(lay.in_axes):
            entries[lay.stack + a] = f"i{k}"
        for k, a in enumerate(lay.out_axes):
            entries[lay.stack + a] = f"o{k}"
        specs[path] = P(*entries)
    param_specs = {}
    for path, spec in specs.items():
        d = param_specs
        *mods, leaf = path.split("/")
        for m in mods:
            d = d.setdefault(m, {})
        d[leaf] = spec
    out = lj.sharding.adapter_specs(adapter, param_specs)
    # independent expectation, per array name (the roles every method in the table uses)
    for (path, node), (_, snode) in zip(lj.tree.adapter_nodes(adapter), lj.tree.adapter_nodes(out)):
        lay = node.layout
        i = tuple(f"i{k}" for k in range(len(lay.in_axes)))
        o = tuple(f"o{k}" for k in range(len(lay.out_axes)))
        i, o = (i[0] if len(i) == 1 else i), (o[0] if len(o) == 1 else o)
        want = {"a": (i, None), "b": (None, o), "m": (o,), "lambda_b": (o,), "lambda_d": (None,)}
        for k, arr in node.params.items():
            spec = snode[k]
            assert len(spec) == arr.ndim, (path, k, spec, arr.shape)
            assert tuple(spec) == ("s",) * lay.stack + want[k], (path, k, spec)


@pytest.mark.parametrize("name", ROWS)
def test_train_step_is_not_retraced_for_another_adapter(name, linen_model):
    row = ROWS[name]
    model, params, layouts, x = linen_model
    _, frozen, adapter = _setup(row, params, layouts, row.targets)
    traces = []

    def loss_fn(run, batch):
        traces.append(1)
        return jnp.mean(run(batch) ** 2)

    ts = lj.train.make_train_step(model, loss_fn, optax.adam(1e-3))
    a1, s1, l1 = ts.step(adapter, ts.init(adapter), frozen, x)
    _, frozen2, adapter2 = _setup(row, params, layouts, row.targets, seed=4)
    a2, s2, l2 = ts.step(adapter2, ts.init(adapter2), frozen, x)
    assert len(traces) == 1
    assert np.isfinite(float(l1)) and np.isfinite(float(l2))
