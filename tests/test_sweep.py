"""Sweeps: K vmapped runs in one jitted step equal K separate sequential runs (seeds, rates, ranks)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from conftest import TinyModel, rel_err
from lowrank_jax import sweep as ls

TARGETS = r"block_0/(attn/(query|value)|fc1)/kernel"
STEPS = 3


def _xent(run, batch):
    return optax.softmax_cross_entropy_with_integer_labels(run(batch["x"]), batch["y"]).mean()


@pytest.fixture(scope="module")
def setup():
    model = TinyModel(scan=False, layers=1, dim=16)
    x = jax.random.normal(jax.random.key(0), (8, 5, 8))
    batch = {"x": x, "y": jnp.arange(8) % 4}
    variables = jax.jit(model.init)(jax.random.key(1), x)
    return model, variables["params"], lj.discover(model, variables, x), batch


def _sequential(model, frozen, adapter, tx, batches, keys, ts=None):
    """The reference: one ordinary lj.train step per call, run after run."""
    ts = ts or lj.train.make_train_step(model, _xent, tx, donate=False)
    opt_state = ts.init(adapter)
    losses = []
    for t in range(STEPS):
        adapter, opt_state, loss = ts.step(adapter, opt_state, frozen, batches[t], keys[t])
        losses.append(float(loss))
    return adapter, np.array(losses)


def _assert_runs_equal(got_adapters, got_losses, want):
    for k, (adapter, losses) in enumerate(want):
        np.testing.assert_allclose(got_losses[:, k], losses, rtol=1e-5, err_msg=f"run {k}")
        got = got_adapters[k]
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(adapter)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(adapter)):
            assert g.shape == w.shape
            assert rel_err(g, w) < 1e-5, (k, rel_err(g, w))


def _train_sweep(sweep, runs, frozen, batches, keys):
    opt_states = sweep.init(runs)
    losses = []
    for t in range(STEPS):
        runs, opt_states, loss = sweep.step(runs, opt_states, frozen, batches[t], keys[t])
        assert loss.shape == (runs.k,)
        losses.append(np.asarray(loss))
    return runs, np.stack(losses)


def test_seeds_with_dropout_dora(setup):
    model, params, layouts, batch = setup
    method = lj.DoRA(rank=3, alpha=6.0, targets=TARGETS, dropout=0.2)
    inits = [lj.init(method, params, jax.random.key(10 + k), layouts=layouts) for k in range(3)]
    frozen = inits[0][0]
    adapters = [a for _, a in inits]
    keys = [jax.random.split(jax.random.key(100 + t), 3) for t in range(STEPS)]
    batches = [batch] * STEPS
    ts = lj.train.make_train_step(model, _xent, optax.adam(2e-2), donate=False)   # one compile, 3 runs
    want = [_sequential(model, frozen, adapters[k], None, batches, [kt[k] for kt in keys], ts) for k in range(3)]
    assert len({float(w[1][-1]) for w in want}) == 3          # the seeds really gave different runs
    # The base is shared, not copied per run: no value of shape (K, *kernel) for any adapted kernel.
    sweep = ls.make_sweep_step(model, _xent, optax.adam(2e-2))
    runs = ls.stack_runs(adapters)
    jaxpr = str(jax.make_jaxpr(sweep.step)(runs, sweep.init(runs), frozen, batch, keys[0]))
    kernels = [n.shape for n in jax.tree_util.tree_leaves(adapters[0],
                                                          is_leaf=lambda x: isinstance(x, lj.AdapterParams))]
    assert kernels and not [k for k in kernels if f"f32[3,{','.join(map(str, k))}]" in jaxpr]
    assert f"f32[3,{','.join(map(str, kernels[0]))}]" in str(jax.make_jaxpr(
        lambda w: jnp.broadcast_to(w, (3, *w.shape)))(jnp.zeros(kernels[0])))     # the probe would see one

    for runs_per_batch in (None, 1):   # vmap over all 3; lax.map: one run at a time in a compiled loop
        sweep = ls.make_sweep_step(model, _xent, optax.adam(2e-2), runs_per_batch=runs_per_batch)
        runs, losses = _train_sweep(sweep, ls.stack_runs(adapters), frozen, batches, keys)
        _assert_runs_equal(ls.unstack_runs(runs), losses, want)


def test_learning_rates_with_per_run_batches_vera(setup):
    model, params, layouts, batch = setup
    frozen, adapter = lj.init(lj.VeRA(rank=8, targets=TARGETS), params, jax.random.key(0), layouts=layouts)
    lrs = [3e-3, 1e-2, 3e-2]
    xs = jax.random.normal(jax.random.key(5), (STEPS, 3, 8, 5, 8))       # (step, run, ...) distinct data
    batches = [{"x": xs[t], "y": jnp.stack([batch["y"]] * 3)} for t in range(STEPS)]
    want = [_sequential(model, frozen, adapter, optax.adam(lr), [jax.tree_util.tree_map(lambda v: v[k], b)
                                                                  for b in batches], [None] * STEPS)
            for k, lr in enumerate(lrs)]
    sweep = ls.make_sweep_step(model, _xent, optax.adam, learning_rates=lrs, per_run_batch=True)
    runs, losses = _train_sweep(sweep, ls.stack_runs([adapter] * 3), frozen, batches, [None] * STEPS)
    _assert_runs_equal(ls.unstack_runs(runs), losses, want)
    with pytest.raises(ValueError, match="3 learning_rates for 2 runs"):
        sweep.init(ls.stack_runs([adapter] * 2))


def test_mixed_ranks_lora_equal_their_own_rank_runs_and_padding_stays_zero(setup):
    model, params, layouts, batch = setup
    methods = [lj.LoRA(rank=2, alpha=4.0, targets=TARGETS),
               lj.LoRA(rank=6, alpha=16.0, targets=TARGETS, rslora=True),
               lj.LoRA(rank=4, alpha=4.0, targets=TARGETS, init="gaussian")]
    inits = [lj.init(m, params, jax.random.key(20 + k), layouts=layouts) for k, m in enumerate(methods)]
    frozen = inits[0][0]
    adapters = [a for _, a in inits]
    batches = [batch] * STEPS
    tx = optax.adamw(2e-2, weight_decay=0.1)
    want = [_sequential(model, frozen, a, tx, batches, [None] * STEPS) for a in adapters]

    runs = ls.stack_runs(adapters)
    path = "block_0/attn/query/kernel"
    np.testing.assert_array_equal(np.asarray(runs.rank[path]), [2, 6, 4])
    np.testing.assert_allclose(np.asarray(runs.scale[path]),
                               [m.scaling / methods[1].scaling for m in methods], rtol=1e-7)
    node = runs.adapter["block_0"]["attn"]["query"]["kernel"]
    assert node.method == methods[1] and node.a.shape == (3, 16, 6) and node.b.shape == (3, 6, 16)

    sweep = ls.make_sweep_step(model, _xent, tx)
    runs, losses = _train_sweep(sweep, runs, frozen, batches, [None] * STEPS)
    node = runs.adapter["block_0"]["attn"]["query"]["kernel"]
    assert not np.any(np.asarray(node.a[0, :, 2:])) and not np.any(np.asarray(node.b[2, 4:]))

    # Why padding is exact: with B ≠ 0 now, the padded columns of A / rows of B still get exactly
    # zero gradient, while the live ones do not.
    grads = jax.grad(lambda ad: sweep.loss(ls.Runs(ad, runs.scale, runs.rank, runs.methods), frozen,
                                           batch).sum())(runs.adapter)
    g = grads["block_0"]["attn"]["query"]["kernel"]
    assert not np.any(np.asarray(g.a[0, :, 2:])) and not np.any(np.asarray(g.b[0, 2:]))
    assert not np.any(np.asarray(g.a[2, :, 4:])) and not np.any(np.asarray(g.b[2, 4:]))
    assert np.all(np.any(np.asarray(g.a[0, :, :2]) != 0, axis=0))
    assert np.all(np.any(np.asarray(g.b[0, :2]) != 0, axis=1))

    got = ls.unstack_runs(runs)
    assert [a["block_0"]["fc1"]["kernel"].method for a in got] == methods
    assert got[0]["block_0"]["fc1"]["kernel"].a.shape == (16, 2)
    _assert_runs_equal(got, losses, want)


def test_stack_runs_errors_name_the_mismatch(setup):
    _, params, layouts, _ = setup
    _, lora = lj.init(lj.LoRA(rank=2, targets=TARGETS), params, jax.random.key(0), layouts=layouts)
    _, dora = lj.init(lj.DoRA(rank=2, targets=TARGETS), params, jax.random.key(0), layouts=layouts)
    _, drop = lj.init(lj.LoRA(rank=2, targets=TARGETS, dropout=0.1), params, jax.random.key(0), layouts=layouts)
    _, fewer = lj.init(lj.LoRA(rank=2, targets=r"block_0/fc1/kernel"), params, jax.random.key(0), layouts=layouts)
    with pytest.raises(ValueError, match="got no adapters"):
        ls.stack_runs([])
    with pytest.raises(ValueError, match=r"block_0/attn/query/kernel: run 1 has arrays \['a', 'b', 'm'\]"):
        ls.stack_runs([lora, dora])
    with pytest.raises(ValueError, match=r"block_0/attn/query/kernel: run 1 uses LoRA\(.*dropout=0.1"):
        ls.stack_runs([lora, drop])
    with pytest.raises(ValueError, match="run 1 adapts paths"):
        ls.stack_runs([lora, fewer])
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        ls.make_sweep_step(TinyModel(), _xent, optax.adam(1e-3), learning_rates=[1e-3])
    with pytest.raises(TypeError, match="must be an optax GradientTransformation"):
        ls.make_sweep_step(TinyModel(), _xent, optax.adam)
    with pytest.raises(ValueError, match="runs_per_batch must be None or an integer >= 1, got 0"):
        ls.make_sweep_step(TinyModel(), _xent, optax.adam(1e-3), runs_per_batch=0)
