"""Multi-host training on one machine: 2 processes × 4 CPU devices over loopback (run by tests/test_mesh.py).

``python tests/multihost_case.py PROCESS_ID PORT DIRECTORY`` (twice, ids 0 and 1) runs the README's
multi-host recipe: ``jax.distributed.initialize`` with coordinator ``127.0.0.1:PORT``; a global 4×2
``("fsdp", "tp")`` mesh whose ``fsdp`` axis spans the two processes; the same params on every host,
placed shard by shard (``jax.make_array_from_callback``); each process's own half of the batch
(``jax.make_array_from_process_local_data``); ``lj.init`` and one ``make_train_step(..., mesh=mesh)``
step, checked against a one-device step computed locally; then both processes save adapter +
optimizer state with :class:`lowrank_jax.io.TrainCheckpointer` (orbax multi-host), restore it onto
the same shardings and check every local shard bitwise. Process 0 also writes the full arrays
(``DIRECTORY/expected.npz``) for ``python tests/multihost_case.py restore DIRECTORY``, which restores
the checkpoint in a fresh single process on 8 devices and compares bitwise.
"""

from __future__ import annotations

import os
import sys

if sys.argv[1] == "restore":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lowrank_jax as lj  # noqa: E402

SPECS = {"up": {"kernel": P("fsdp", "tp"), "bias": P("tp")}, "down": {"kernel": P("tp", "fsdp"), "bias": P()}}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="down")(jax.nn.gelu(nn.Dense(128, name="up")(x)))


def loss_fn(run, batch):
    return jnp.mean((run(batch["x"]) - batch["y"]) ** 2)


def host_setup():
    """The same params and global batch on every host (numpy, nothing on a device)."""
    model = MLP()
    x = np.asarray(jax.random.normal(jax.random.key(0), (16, 64)))
    y = np.asarray(jax.random.normal(jax.random.key(1), (16, 16)))
    params = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(2), x[:1])["params"])
    return model, params, {"x": x, "y": y}


def method():
    return lj.DoRA(rank=4, alpha=8.0, targets=r"(up|down)/kernel")


def tx():
    return optax.adam(1e-2, eps=1e-3)


def flat(tree):
    return [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def worker(pid: int, port: str, directory: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))   # fsdp spans the hosts, tp inside one
    model, params_host, batch_host = host_setup()

    # params: every host holds the same numpy values and puts only its own shards on its devices
    shardings = lj.sharding.named(mesh, SPECS)
    params = jax.tree_util.tree_map(
        lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx]), params_host, shardings)
    # data: each process feeds its own rows of the global batch
    rows = NamedSharding(mesh, P("fsdp"))
    local = {k: v[8 * pid: 8 * pid + 8] for k, v in batch_host.items()}
    batch = {k: jax.make_array_from_process_local_data(rows, v) for k, v in local.items()}

    frozen, adapter = lj.init(method(), params, jax.random.key(3))
    assert adapter["up"]["kernel"]["a"].sharding.spec == P("fsdp", None)
    assert adapter["down"]["kernel"]["m"].sharding.spec == P("fsdp")
    ts = lj.train.make_train_step(model, loss_fn, tx(), mesh=mesh)
    opt = ts.init(adapter)
    adapter, opt, loss = ts.step(adapter, opt, frozen, batch)

    # the one-device step, computed on this host's first device
    with jax.default_device(jax.local_devices()[0]):
        f1, a1 = lj.init(method(), params_host, jax.random.key(3))
        ts1 = lj.train.make_train_step(model, loss_fn, tx())
        a1, s1, l1 = ts1.step(a1, ts1.init(a1), f1, batch_host)
        ref = jax.device_get((a1, s1))
    assert abs(float(loss) - float(l1)) <= 1e-5 * abs(float(l1)), (float(loss), float(l1))
    for (path, g), (_, r) in zip(flat((adapter, opt)), flat(ref)):
        r = np.asarray(r)
        for shard in g.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), r[shard.index], rtol=1e-5,
                                       atol=1e-5 * float(np.max(np.abs(r)) or 1.0), err_msg=path)

    # multi-host checkpoint: every process calls save / restore (orbax writes each shard once)
    saved = {path: {str(s.index): np.asarray(s.data) for s in x.addressable_shards} for path, x in flat((adapter, opt))}
    full = {path: multihost_utils.process_allgather(x, tiled=True) for path, x in flat((adapter, opt))}
    if pid == 0:
        np.savez(os.path.join(directory, "expected.npz"), **{f"a{i}": v for i, v in enumerate(full.values())})
    ckpt = lj.io.TrainCheckpointer(os.path.join(directory, "ckpt"), max_to_keep=2)
    ckpt.save(1, adapter, opt, extra={"loss": float(loss)})
    ckpt.close()
    multihost_utils.sync_global_devices("saved")
    reader = lj.io.TrainCheckpointer(os.path.join(directory, "ckpt"), read_only=True)
    step, adapter_r, opt_r, rng, extra = reader.restore(adapter_like=adapter, opt_state_like=opt)
    sums = reader.read_meta(1)["checksums"]   # arrays spread over several processes are saved without sha256
    reader.close()
    assert step == 1 and rng is None and extra == {"loss": float(loss)}, (step, rng, extra)
    n = 0
    for (path, x) in flat((adapter_r, opt_r)):
        for s in x.addressable_shards:
            assert np.array_equal(np.asarray(s.data), saved[path][str(s.index)]), f"restored {path} {s.index} differs"
            n += 1
        assert x.sharding == dict(flat((adapter, opt)))[path].sharding, path
    print("RESULT " + json.dumps({"process": pid, "loss": float(loss), "shards_checked": n,
                                  "arrays": len(sums), "arrays_with_sha256": sum(v is not None for v in sums.values())}))
    jax.distributed.shutdown()


def restore_single(directory: str) -> None:
    """The checkpoint both processes wrote, restored by one process on 8 devices: bitwise the gathered arrays."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))
    model, params_host, _ = host_setup()
    params = lj.sharding.place(params_host, SPECS, mesh)
    _, adapter = lj.init(method(), params, jax.random.key(3))
    opt = lj.sharding.placed_opt_init(tx().init, mesh)(adapter)
    with lj.io.TrainCheckpointer(os.path.join(directory, "ckpt"), read_only=True) as reader:
        step, adapter_r, opt_r, _, _ = reader.restore(adapter_like=adapter, opt_state_like=opt)
    expected = np.load(os.path.join(directory, "expected.npz"))
    leaves = flat((adapter_r, opt_r))
    for i, (path, x) in enumerate(leaves):
        assert np.array_equal(np.asarray(x), expected[f"a{i}"]), f"restored {path} differs"
        assert x.sharding == dict(flat((adapter, opt)))[path].sharding, path
    print("RESULT " + json.dumps({"restored_arrays": len(leaves), "step": step}))


if __name__ == "__main__":
    if sys.argv[1] == "restore":
        restore_single(sys.argv[2])
    else:
        worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
