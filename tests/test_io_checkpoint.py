"""Training checkpoints: exact resume in a fresh process, interrupted saves, retention, mismatches."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax.io import load_adapter, save_adapter
from lowrank_jax.io.checkpoint import TrainCheckpointer

N = 6
TESTS = Path(__file__).resolve().parent


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, name="fc1")(x))
        h = jnp.tanh(nn.Dense(16, name="fc2")(h))
        return nn.Dense(4, name="head")(h)


def _loss(run, batch):
    return optax.softmax_cross_entropy_with_integer_labels(run(batch["x"]), batch["y"]).mean()


def _setup():
    model = MLP()
    batch = {"x": jax.random.normal(jax.random.key(0), (8, 6)), "y": jnp.arange(8) % 4}
    params = model.init(jax.random.key(1), batch["x"])["params"]
    frozen, adapter = lj.init([lj.LoRA(rank=2, alpha=4.0, dropout=0.1, targets=r"fc\d/kernel"),
                               lj.DoRA(rank=2, targets=r"head/kernel")], params, jax.random.key(2))
    ts = lj.train.make_train_step(model, _loss, optax.adam(1e-2))
    return frozen, adapter, ts, batch


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def _run(ts, adapter, opt, frozen, batch, rng, n):
    for _ in range(n):
        rng, sub = jax.random.split(rng)
        adapter, opt, _ = ts.step(adapter, opt, frozen, batch, sub)
    return adapter, opt, rng


def _child_resume(ckpt_dir: str, out_dir: str) -> None:
    """Runs in a fresh interpreter: restore the latest step and train to step N."""
    frozen, adapter0, ts, batch = _setup()
    with TrainCheckpointer(ckpt_dir) as ck:
        step, adapter, opt, rng, extra = ck.restore(adapter_like=adapter0, opt_state_like=ts.init(adapter0))
    assert extra == {"data_position": step * 8}, extra
    adapter, opt, rng = _run(ts, adapter, opt, frozen, batch, rng, N - step)
    save_adapter(Path(out_dir) / "adapter", adapter)
    np.savez(Path(out_dir) / "opt.npz", *[np.asarray(x) for x in jax.tree_util.tree_leaves(opt)],
             rng=np.asarray(jax.random.key_data(rng)))


def _child_killed(ckpt_dir: str) -> None:
    """Save step 1, then die with SIGKILL in the middle of saving step 2."""
    import orbax.checkpoint as ocp
    frozen, adapter, ts, batch = _setup()
    ck = TrainCheckpointer(ckpt_dir)
    ck.save(1, adapter, ts.init(adapter), rng=jax.random.key(1))

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.handlers.JsonCheckpointHandler._save_fn = die
    ck.save(2, adapter, ts.init(adapter), rng=jax.random.key(2))


def _in_fresh_process(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", "import conftest, test_io_checkpoint as T; " + code],
                          cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)


def _bits(x):
    return np.atleast_1d(np.asarray(x)).view(np.uint8)


def test_exact_resume_in_a_fresh_process(tmp_path):
    frozen, adapter0, ts, batch = _setup()
    key = jax.random.key(42)
    full_adapter, full_opt, full_rng = _run(ts, _copy(adapter0), ts.init(adapter0), frozen, batch, key, N)

    half_adapter, half_opt, half_rng = _run(ts, _copy(adapter0), ts.init(adapter0), frozen, batch, key, N // 2)
    ck = TrainCheckpointer(tmp_path / "ckpt")
    ck.save(N // 2, half_adapter, half_opt, rng=half_rng, extra={"data_position": N // 2 * 8})
    ck.close()
    assert not (tmp_path / "ckpt" / str(N // 2) / "frozen").exists()

    out = tmp_path / "out"
    out.mkdir()
    proc = _in_fresh_process(f"T._child_resume({str(tmp_path / 'ckpt')!r}, {str(out)!r})")
    assert proc.returncode == 0, proc.stderr[-3000:]

    resumed = load_adapter(out / "adapter", frozen)
    assert jax.tree_util.tree_structure(resumed) == jax.tree_util.tree_structure(full_adapter)
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(full_adapter)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    opt = np.load(out / "opt.npz")
    full_leaves = jax.tree_util.tree_leaves(full_opt)
    assert len(opt.files) == len(full_leaves) + 1
    for i, b in enumerate(full_leaves):
        np.testing.assert_array_equal(_bits(opt[f"arr_{i}"]), _bits(b))
    np.testing.assert_array_equal(opt["rng"], np.asarray(jax.random.key_data(full_rng)))
    # Training actually moved the adapter.
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4 for a, b in
               zip(jax.tree_util.tree_leaves(full_adapter), jax.tree_util.tree_leaves(adapter0)))


def test_killed_save_leaves_previous_step_loadable(tmp_path):
    proc = _in_fresh_process(f"T._child_killed({str(tmp_path / 'ckpt')!r})")
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    leftovers = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "1" in leftovers and "2" not in leftovers, leftovers  # step 2 exists only as a temporary directory
    frozen, adapter0, ts, batch = _setup()
    ck = TrainCheckpointer(tmp_path / "ckpt")
    assert ck.all_steps() == [1] and ck.latest_step() == 1
    step, adapter, opt, rng, _ = ck.restore(adapter_like=adapter0, opt_state_like=ts.init(adapter0))
    assert step == 1
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(rng)), np.asarray(jax.random.key_data(jax.random.key(1))))
    ck.save(2, adapter, opt)  # the interrupted step can be written again
    assert ck.all_steps() == [1, 2]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("_")) == ["1", "2"]


def test_failed_save_in_process(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    frozen, adapter, ts, batch = _setup()
    opt = ts.init(adapter)
    ck = TrainCheckpointer(tmp_path / "ckpt")
    ck.save(1, adapter, opt)

    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", boom)
    with pytest.raises(Exception, match="injected"):
        ck.save(2, adapter, opt)
    monkeypatch.undo()
    ck.close()  # one writer per directory: the lock passes to the next checkpointer
    fresh = TrainCheckpointer(tmp_path / "ckpt")
    assert fresh.all_steps() == [1]
    assert fresh.restore(adapter_like=adapter, opt_state_like=opt)[0] == 1


def test_max_to_keep_rng_forms_and_mismatches(tmp_path):
    frozen, adapter, ts, batch = _setup()
    opt = ts.init(adapter)
    ck = TrainCheckpointer(tmp_path / "ckpt", max_to_keep=2)
    for s in range(5):
        ck.save(s, adapter, opt, rng=jax.random.PRNGKey(s) if s % 2 else jax.random.key(s), extra={"s": s})
    assert ck.all_steps() == [3, 4] and ck.latest_step() == 4
    with pytest.raises(FileNotFoundError, match="no committed checkpoint for step 1"):
        ck.restore(1, adapter_like=adapter, opt_state_like=opt)

    step, ad, op, rng, extra = ck.restore(3, adapter_like=adapter, opt_state_like=opt)
    assert step == 3 and extra == {"s": 3} and rng.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(rng), np.asarray(jax.random.PRNGKey(3)))
    assert jax.tree_util.tree_structure(op) == jax.tree_util.tree_structure(opt)
    for a, b in zip(jax.tree_util.tree_leaves(ad), jax.tree_util.tree_leaves(adapter)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    step, ad, op, rng, _ = ck.restore()  # no *_like: the adapter is rebuilt from the description
    assert step == 4 and op is None and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    assert jax.tree_util.tree_structure(ad) == jax.tree_util.tree_structure(adapter)

    # Abstract targets work too.
    abstract = jax.eval_shape(lambda: adapter)
    ad2 = ck.restore(adapter_like=abstract, opt_state_like=jax.eval_shape(ts.init, adapter))[1]
    assert jax.tree_util.tree_structure(ad2) == jax.tree_util.tree_structure(adapter)

    params = {"fc1": {"kernel": jnp.zeros((6, 16))}}
    _, other = lj.init(lj.LoRA(rank=3, targets=r"fc1/kernel"), params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"adapter_like has 1"):
        ck.restore(adapter_like=other)
    _, other = lj.init([lj.LoRA(rank=3, alpha=4.0, dropout=0.1, targets=r"fc\d/kernel"),
                        lj.DoRA(rank=2, targets=r"head/kernel")], lj.base_params(frozen), jax.random.key(2))
    with pytest.raises(ValueError, match=r"adapter node 'fc1/kernel' differs from adapter_like in \['arrays', 'method'\]"):
        ck.restore(adapter_like=other)
    with pytest.raises(ValueError, match="optimizer state"):
        ck.restore(adapter_like=adapter, opt_state_like=optax.sgd(1e-3, momentum=0.9).init(adapter))
