"""Adapters sharded like their kernels: specs, and a sharded train step equal to the unsharded one."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj


def test_adapter_specs_follow_the_kernel():
    params = {"q": {"kernel": jnp.zeros((2, 8, 4, 2))},   # (stack, d, heads, head_dim)
              "o": {"kernel": jnp.zeros((16, 8))}}
    layouts = {"q/kernel": lj.Layout((0,), (1, 2), stack=1)}
    _, adapter = lj.init([lj.DoRA(rank=2, targets="q/kernel"), lj.LoRA(rank=2, targets="o/kernel")], params,
                         jax.random.key(0), layouts=layouts)
    specs = lj.sharding.adapter_specs(adapter, {"q": {"kernel": P(None, "data", "model", None)},
                                                "o": {"kernel": P("model", None)}})
    q = specs["q"]["kernel"]
    assert q["a"] == P(None, "data", None) and q["b"] == P(None, None, "model") and q["m"] == P(None, "model")
    o = specs["o"]["kernel"]
    assert o["a"] == P("model", None) and o["b"] == P(None, None)


SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lowrank_jax as lj

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(64, name="up")(x)
            return nn.Dense(16, name="down")(jax.nn.relu(h))

    model = M()
    x = jax.random.normal(jax.random.key(0), (32, 16))
    params = model.init(jax.random.key(1), x)["params"]
    frozen, adapter = lj.init(lj.LoRA(rank=4, targets=".*kernel"), params, jax.random.key(2))
    adapter = jax.tree_util.tree_map(lambda a: a + 0.1, adapter)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    pspecs = {"up": {"kernel": P(None, "model"), "bias": P("model")},
              "down": {"kernel": P("model", None), "bias": P()}}
    aspecs = lj.sharding.adapter_specs(adapter, pspecs)
    frozen_s = jax.device_put(frozen, lj.sharding.named(mesh, pspecs))
    adapter_s = jax.device_put(adapter, lj.sharding.named(mesh, aspecs))
    x_s = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ts = lj.train.make_train_step(model, lambda run, b: jnp.mean(run(b) ** 2), optax.adam(1e-2), donate=False)
    a1, _, l1 = ts.step(adapter_s, ts.init(adapter_s), frozen_s, x_s)
    a0, _, l0 = ts.step(adapter, ts.init(adapter), frozen, x)
    assert abs(float(l1) - float(l0)) < 1e-5 * abs(float(l0)), (l1, l0)
    for u, v in zip(jax.tree_util.tree_leaves(a1), jax.tree_util.tree_leaves(a0)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    up_a = a1["up"]["kernel"]["b"]
    assert up_a.sharding.spec == P(None, "model"), up_a.sharding
    print("OK", len(jax.devices()))
""")


def test_sharded_train_step_equals_unsharded():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout
