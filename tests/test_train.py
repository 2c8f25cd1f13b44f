"""Training: only the adapter learns, the frozen tree is untouched, optax state is adapter-sized."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from conftest import BLOCK_TARGETS, TinyModel


def _xent(run, batch):
    logits = run(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _data():
    x = jax.random.normal(jax.random.key(0), (16, 6, 8))
    y = jnp.arange(16) % 4
    return {"x": x, "y": y}


@pytest.mark.parametrize("method", [
    lj.LoRA(rank=4, alpha=8.0, targets=BLOCK_TARGETS),
    lj.DoRA(rank=4, alpha=8.0, targets=BLOCK_TARGETS),
    lj.VeRA(rank=32, targets=BLOCK_TARGETS),
], ids=["lora", "dora", "vera"])
def test_training_a_scanned_attention_model_lowers_the_loss(method):
    model = TinyModel(scan=True)
    batch = _data()
    variables = model.init(jax.random.key(1), batch["x"])
    layouts = lj.discover(model, variables, batch["x"])
    frozen, adapter = lj.init(method, variables["params"], jax.random.key(2), layouts=layouts)
    frozen_copy = jax.tree_util.tree_map(np.array, frozen)
    lr = 3e-2 if isinstance(method, lj.VeRA) else 1e-2
    ts = lj.train.make_train_step(model, _xent, optax.adam(lr))
    opt_state = ts.init(adapter)
    adapter_sizes = sorted(np.size(x) for x in jax.tree_util.tree_leaves(adapter))
    state_sizes = sorted(np.size(x) for x in jax.tree_util.tree_leaves(opt_state) if np.size(x) > 1)
    assert state_sizes == sorted(adapter_sizes * 2)  # Adam's mu and nu for adapter arrays only
    losses = []
    for _ in range(60):
        adapter, opt_state, loss = ts.step(adapter, opt_state, frozen, batch)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen_copy)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_plain_optax_grad_wrt_adapter_only():
    model = TinyModel(scan=False)
    batch = _data()
    variables = model.init(jax.random.key(1), batch["x"])
    frozen, adapter = lj.init(lj.LoRA(rank=2, targets=r"block_0/fc1/kernel"), variables["params"], jax.random.key(2))

    def loss(ad, fz):
        return _xent(lambda x: lj.apply(model, {"params": fz}, ad, x), batch)

    grads = jax.grad(loss)(adapter, frozen)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter)
    assert float(jnp.abs(grads["block_0"]["fc1"]["kernel"]["b"]).sum()) > 0


def test_masked_optimizer_zeroes_frozen_and_keeps_no_state_for_it():
    frozen = {"w": jnp.ones((64, 64))}
    adapter = {"a": jnp.ones((3,))}
    tx = lj.train.masked(optax.adam(0.1))
    tree = {"frozen": frozen, "adapter": adapter}
    state = tx.init(tree)
    sizes = [np.size(x) for x in jax.tree_util.tree_leaves(state)]
    assert 64 * 64 not in sizes and 3 in sizes
    grads = jax.tree_util.tree_map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, state, tree)
    assert not np.any(np.asarray(updates["frozen"]["w"]))
    np.testing.assert_allclose(updates["adapter"]["a"], -0.1, rtol=1e-5)
    with pytest.raises(ValueError, match="expected a mapping with a 'adapter' entry"):
        tx.init({"x": frozen})


def test_loraplus_gives_b_a_larger_learning_rate():
    params = {"l": {"kernel": jnp.ones((6, 5))}}
    _, adapter = lj.init(lj.DoRA(rank=2), params, jax.random.key(0))
    tx = lj.train.loraplus(optax.sgd, 0.01, ratio=16.0)
    grads = jax.tree_util.tree_map(jnp.ones_like, adapter)
    updates, _ = tx.update(grads, tx.init(adapter), adapter)
    node = updates["l"]["kernel"]
    np.testing.assert_allclose(node["a"], -0.01)
    np.testing.assert_allclose(node["b"], -0.16)
    np.testing.assert_allclose(node["m"], -0.16)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        lj.train.loraplus(optax.sgd, 0.01, ratio=0)


def test_merge_path_step_equals_factored_step():
    model = TinyModel(scan=True)
    batch = _data()
    variables = model.init(jax.random.key(1), batch["x"])
    layouts = lj.discover(model, variables, batch["x"])
    frozen, adapter = lj.init(lj.LoRA(rank=4, targets=BLOCK_TARGETS), variables["params"], jax.random.key(2),
                              layouts=layouts)
    a = lj.train.make_train_step(model, _xent, optax.sgd(0.1), donate=False)
    b = lj.train.make_train_step(model, _xent, optax.sgd(0.1), factored=False, donate=False)
    ad_a, _, loss_a = a.step(adapter, a.init(adapter), frozen, batch)
    ad_b, _, loss_b = b.step(adapter, b.init(adapter), frozen, batch)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(ad_a), jax.tree_util.tree_leaves(ad_b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_bf16_base_keeps_fp32_adapters_and_trains():
    model = TinyModel(scan=False)
    batch = _data()
    variables = model.init(jax.random.key(1), batch["x"])
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), variables["params"])
    frozen, adapter = lj.init(lj.LoRA(rank=4, targets=BLOCK_TARGETS), params, jax.random.key(2),
                              layouts=lj.discover(model, variables, batch["x"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(adapter))
    ts = lj.train.make_train_step(model, _xent, optax.adam(1e-2))
    state = ts.init(adapter)
    first = None
    for _ in range(20):
        adapter, state, loss = ts.step(adapter, state, frozen, batch)
        first = first if first is not None else float(loss)
    assert float(loss) < first
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(adapter))
    merged = lj.merge(frozen, adapter)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))
