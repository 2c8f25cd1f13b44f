"""Automatic shardings and train steps on a mesh; multi-host over loopback.

The mesh cases need 8 devices, so they run in subprocesses that set ``XLA_FLAGS`` before jax is
imported (``tests/mesh_cases.py``, ``tests/multihost_case.py``; conftest pins this process to one
device). The spec rules themselves are checked here on abstract meshes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("lora", "dora", "vera", "qlora")


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _mesh_cases(*cases: str) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "mesh_cases.py"), *cases], capture_output=True,
                         text=True, env=_env(), timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-8000:]
    return _result(out.stdout)


# ------------------------------------------------------------------------ 8 simulated devices

def test_fsdp_tp_mesh_dora_qlora_steps_equal_one_device_and_fsdp_bytes():
    """2-D FSDP×TP, DoRA and QLoRA: init placed as the hand-written tables say (by one program that
    holds no whole kernel on a device), one Adam step equal to the one-device step (1e-5), shardings of
    frozen / adapter / optimizer state kept, buffers donated, merge under jit keeps the base shardings,
    no whole adapted kernel gathered beyond the base model's own needs; QLoRA under 8-way FSDP:
    per-device bytes within 10% of 1/8. (LoRA, VeRA and the other meshes: the slow test.)"""
    r = _mesh_cases("fsdp_tp=dora+qlora", "fsdp:bytes=qlora")
    for m in ("dora", "qlora"):
        case = r["fsdp_tp"][m]
        assert case["loss_rel"] < 1e-5 and case["max_rel"] < 1e-5, (m, case)
        assert case["full_kernel_collectives"]["adapted_step"] <= case["full_kernel_collectives"]["base_model"]
        assert case["init_program"]["full_kernel_collectives"] == 0
    assert r["fsdp:bytes"]["qlora"]["bytes_ratio"] < 1.10


@pytest.mark.slow
def test_every_mesh_and_method_equals_one_device():
    """Data parallel, 8-way FSDP (with per-device bytes) and 8-way Megatron TP for LoRA, DoRA, VeRA,
    QLoRA; the 2-D mesh for LoRA and VeRA; Flax logical metadata, NNX annotations, lj.quantize on
    placed params, the NF4 fallback warning. DoRA's norm under TP adds only (r, out) and (r, r)
    partial sums to the row-parallel layer's all-reduce."""
    r = _mesh_cases("dp", "fsdp", "tp", "fsdp_tp=lora+vera", "extra")
    for mesh in ("dp", "fsdp", "tp"):
        for m in METHODS:
            assert r[mesh][m]["max_rel"] < 1e-5 and r[mesh][m]["loss_rel"] < 1e-5, (mesh, m, r[mesh][m])
    for m in METHODS:
        assert r["fsdp"][m]["bytes_ratio"] < 1.10
    for m in ("lora", "vera"):
        assert r["fsdp_tp"][m]["max_rel"] < 1e-5
    extra = r["dora_extra_collectives_tp"]
    assert extra and all(e.startswith(("all-reduce f32[4, 256]", "all-reduce f32[4, 4]")) for e in extra), extra
    assert "k/kernel" in r["extra"]["fallback_warning"]


# ------------------------------------------------------------------------ multi-host

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multihost_two_processes_train_and_checkpoint(tmp_path):
    """2 processes × 4 CPU devices over loopback: jax.distributed, per-host data, one step equal to the
    one-device step, an orbax multi-host checkpoint of adapter + optimizer state written by both
    processes and restored bitwise by both, and by a fresh single process on 8 devices."""
    port = str(_free_port())
    script = os.path.join(HERE, "multihost_case.py")
    procs = [subprocess.Popen([sys.executable, script, str(i), port, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, so[-2000:] + se[-6000:]
    results = [_result(so) for so, _ in outs]
    assert {r["process"] for r in results} == {0, 1}
    assert results[0]["loss"] == results[1]["loss"] and all(r["shards_checked"] > 0 for r in results)
    out = subprocess.run([sys.executable, script, "restore", str(tmp_path)], capture_output=True, text=True,
                         env=_env(), timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    assert _result(out.stdout)["restored_arrays"] > 0


# ------------------------------------------------------------------------ the rules, on abstract meshes

MESH = AbstractMesh((4, 2), ("fsdp", "tp"))


def _nf4(shape, block=64, double=True, layers=0):
    w = jax.ShapeDtypeStruct(((layers,) if layers else ()) + shape, jnp.float32)
    layouts = {"kernel": lj.Layout(stack=1)} if layers else None
    return jax.eval_shape(lambda w: lj.quantize({"kernel": w}, lj.NF4(block_size=block, double_quant=double),
                                                layouts=layouts), w)["kernel"]


def test_nf4_blocks_follow_output_rows_then_fall_back_with_reason():
    q = _nf4((256, 1024), layers=2)                          # kernel (2, 256, 1024): torch rows = 1024 outputs
    specs, why = lj.sharding.nf4_specs(q, P(None, "fsdp", "tp"), MESH, "k")
    assert why is None
    assert specs.packed == P(None, ("tp", "fsdp")) and specs.absmax == P(None, ("tp", "fsdp"))
    assert specs.nested_absmax == P(None, ("tp", "fsdp")) and specs.offset == P(None)   # 4096 blocks = 2·256·8
    q = _nf4((48, 24), double=False)                         # 24 rows of 48: 3 rows × 48 = 144 weights per device
    specs, why = lj.sharding.nf4_specs(q, P("fsdp", "tp"), MESH, "k")
    assert specs.packed == P("tp") and "not whole blocks of 64" in why and "kept ('tp',)" in why
    q = _nf4((16, 6), double=False)                          # 2 devices × 3 rows × 16 = 48 weights: not a block
    specs, why = lj.sharding.nf4_specs(q, P(None, "tp"), MESH, "k")
    assert specs.packed == P(None) and "not whole blocks" in why and "replicated along the blocks" in why
    q = _nf4((64, 6), double=False)                          # 6 output rows over 4 devices
    specs, why = lj.sharding.nf4_specs(q, P(None, "fsdp"), MESH, "k")
    assert specs.packed == P(None) and "6 output rows do not split into 4 equal parts" in why
    specs, why = lj.sharding.nf4_specs(q, P(None, "tp"), MESH, "k")   # 3 rows × 64: whole blocks
    assert specs.packed == P("tp") and why is None


def test_specs_of_reads_explicit_trees_boxes_and_nf4_placement():
    import flax.linen as nn
    tree = {"a": P("x"), "b": None, "c": NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), P(None, "x")),
            "d": nn.Partitioned(jnp.zeros((2, 2)), ("x", None)), "e": jnp.zeros(3)}
    specs = lj.sharding.specs_of(tree)
    assert specs == {"a": P("x"), "b": None, "c": P(None, "x"), "d": P("x", None), "e": P()}
    with nn.logical_axis_rules([("embed", "fsdp")]):
        box = {"k": nn.LogicallyPartitioned(jnp.zeros((2, 2)), ("embed", "mlp"))}
        assert lj.sharding.specs_of(box) == {"k": P("fsdp", None)}


def test_specs_of_nnx_annotations_with_logical_rules():
    import flax.linen as nn
    from flax import nnx

    class Lin(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("embed", "fsdp"), ("mlp", "tp")]):
        model = Lin(nnx.Rngs(0))
        specs = lj.sharding.specs_of(model)
    assert specs["up"]["kernel"] == P("fsdp", "tp") and specs["up"]["bias"] == P(), specs
    abstract = jax.eval_shape(lambda: {"k": nn.LogicallyPartitioned(jnp.zeros((4, 4)), ("embed", "mlp"))})
    assert lj.sharding.specs_of(abstract, rules=[("embed", "tp")]) == {"k": P("tp", None)}


def test_adapter_and_frozen_specs_with_fsdp_axes_and_shared_projections():
    params = {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), jnp.float32)},
              "down": {"kernel": jax.ShapeDtypeStruct((256, 64), jnp.float32)}}
    pspecs = {"up": {"kernel": P(None, "tp")}, "down": {"kernel": P("tp", None)}}
    frozen, adapter = jax.eval_shape(lambda p: lj.init(lj.VeRA(rank=8, targets=".*kernel"), p, jax.random.key(0)),
                                     params)
    fs = lj.sharding.frozen_specs(frozen, adapter, pspecs, MESH)
    shared = fs[lj.SHARED_KEY]["vera_0"]
    assert shared["a"] == P(None, "tp") and shared["b"] == P("tp", None)   # from the kernels of full in / out
    a = lj.sharding.adapter_specs(adapter, pspecs)
    assert a["up"]["kernel"]["lambda_b"] == P("tp") and a["down"]["kernel"]["lambda_b"] == P(None)
    with lj.sharding.fsdp_axes("fsdp"):
        a = lj.sharding.adapter_specs(adapter, pspecs, MESH)
        fs = lj.sharding.frozen_specs(frozen, adapter, pspecs, MESH)
    assert a["up"]["kernel"]["lambda_b"] == P(("tp", "fsdp")) and a["down"]["kernel"]["lambda_b"] == P("fsdp")
    assert a["up"]["kernel"]["lambda_d"] == P(None)                        # rank axes never take a mesh axis
    assert fs[lj.SHARED_KEY]["vera_0"]["a"] == P(None, ("tp", "fsdp"))
    _, lora = jax.eval_shape(lambda p: lj.init(lj.LoRA(rank=4, targets=".*kernel"), p, jax.random.key(0)), params)
    with lj.sharding.fsdp_axes("fsdp"):
        s = lj.sharding.adapter_specs(lora, pspecs, MESH)
    assert s["up"]["kernel"]["a"] == P("fsdp", None) and s["up"]["kernel"]["b"] == P(None, ("tp", "fsdp"))


def test_opt_state_specs_follow_adapter_paths_inside_masked_states():
    params = {"d": {"kernel": jnp.ones((8, 4))}}
    _, adapter = lj.init(lj.LoRA(rank=2), params, jax.random.key(0))
    aspecs = lj.sharding.adapter_specs(adapter, {"d": {"kernel": P("x", "y")}})
    for tx in (optax.adam(1e-3), lj.train.loraplus(optax.adam, 1e-3)):
        state = jax.eval_shape(tx.init, adapter)
        specs = lj.sharding.opt_state_specs(state, adapter, aspecs)
        leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
        got = {jax.tree_util.keystr(k): v for k, v in leaves}
        mus = {k: v for k, v in got.items() if ".mu[" in k}
        assert mus and all(v == (P("x", None) if k.endswith(".a") else P(None, "y")) for k, v in mus.items()), got
        assert all(v == P() for k, v in got.items() if "count" in k)


def test_train_step_mesh_keyword_on_one_device_and_explicit_shardings():
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x)

    model, x = M(), jnp.ones((2, 8))
    frozen, adapter = lj.init(lj.LoRA(rank=2), model.init(jax.random.key(0), x)["params"], jax.random.key(1))
    loss = lambda run, b: jnp.mean(run(b) ** 2)  # noqa: E731
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    ref = lj.train.make_train_step(model, loss, optax.adam(1e-2), donate=False)
    a0, _, v0 = ref.step(adapter, ref.init(adapter), frozen, x)
    ts = lj.train.make_train_step(model, loss, optax.adam(1e-2), mesh=mesh)
    opt = ts.init(adapter)
    a, o, v = ts.step(adapter, opt, frozen, x)
    assert isinstance(a["Dense_0"]["kernel"]["a"].sharding, NamedSharding)
    assert isinstance(o[0].mu["Dense_0"]["kernel"]["b"].sharding, NamedSharding)
    assert float(v) == float(v0)
    with pytest.raises(RuntimeError, match="donated"):
        ts.step(adapter, opt, frozen, x)
    rep = NamedSharding(mesh, P())
    ts2 = lj.train.make_train_step(model, loss, optax.adam(1e-2), in_shardings=rep, out_shardings=rep)
    a2, _, _ = ts2.step(a0, ts2.init(a0), frozen, x)
    assert a2["Dense_0"]["kernel"]["b"].sharding == rep
    with pytest.raises(ValueError, match="not both"):
        lj.train.make_train_step(model, loss, optax.adam(1e-2), mesh=mesh, in_shardings=rep)


def test_init_on_unplaced_params_is_unchanged():
    """Single-device params take the eager path: no jit, no warnings, same arrays."""
    params = {"d": {"kernel": jnp.ones((8, 4))}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen, adapter = lj.init(lj.LoRA(rank=2), params, jax.random.key(0))
    assert not isinstance(adapter["d"]["kernel"]["a"].sharding, NamedSharding)
