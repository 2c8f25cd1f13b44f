"""Train steps on an 8-device mesh against the one-device step (run by tests/test_mesh.py as a subprocess).

``python tests/mesh_cases.py CASE [CASE ...]`` forces 8 host devices before jax is imported and runs
each ``CASE = MESH[:bytes][=METHOD+METHOD...]`` — mesh ``dp``, ``fsdp``, ``tp``, ``fsdp_tp`` (``:bytes``:
placement and bytes only, no step), methods ``lora``, ``dora``, ``vera``, ``qlora`` (default: all) —
or ``extra``. For every mesh and method:

* ``lj.init`` on the placed params places frozen and adapter arrays as the tables below say (written
  out by hand from the rules, not computed by the library) and equals the one-device init (random
  factors bitwise; norms and caches to rounding; NF4 codes up to one double-quant absmax step);
* one Adam step of ``make_train_step(..., mesh=mesh)`` from the same (randomized) adapter gives the
  loss, adapter and optimizer state of the one-device step within 1e-5 (relative to the largest
  magnitude), keeps every sharding, and donates the adapter and optimizer-state buffers;
* ``jax.jit(lj.merge)`` keeps the base kernels' shardings;
* ``fsdp``: per-device bytes of frozen + adapter + optimizer state within 10% of 1/8 of the total;
* ``fsdp_tp``: the compiled step all-gathers no full base kernel more often than the base model's own
  forward + backward does (optimized HLO);
* ``tp``: the collectives of the DoRA step that the LoRA step does not have (DoRA's column norm).

Also (mesh ``extra``): specs from Flax logical metadata and from an NNX model, ``lj.quantize`` on
placed params, and the NF4 fallback warning. Prints one JSON line ``RESULT {...}`` with the figures.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lowrank_jax as lj  # noqa: E402
from conftest import randomize  # noqa: E402  (tests/ is on sys.path: this script's directory)

D, HID, LAYERS, FEAT, CLASSES = 256, 1024, 2, 16, 8
TARGETS = r"blocks/(up|down)/kernel"
TOL = 1e-5


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(HID, name="up")(x)
        return x + nn.Dense(D, name="down")(jax.nn.gelu(h)), None


class Net(nn.Module):
    """Input projection, ``LAYERS`` MLP blocks stacked by ``nn.scan`` (kernels ``(layer, in, out)``), head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(CLASSES, name="head")(x.mean(axis=1))


METHODS = {
    "lora": lambda: lj.LoRA(rank=4, alpha=8.0, targets=TARGETS),
    "dora": lambda: lj.DoRA(rank=4, alpha=8.0, targets=TARGETS, detach_norm=False),
    "vera": lambda: lj.VeRA(rank=16, targets=TARGETS),
    "qlora": lambda: lj.LoRA(rank=4, alpha=8.0, targets=TARGETS, quant=lj.NF4(block_size=64)),
}

# mesh shape, axis names, storage-only (FSDP) axes, batch spec, param specs
MESHES = {
    "dp": ((8,), ("data",), (), P("data")),
    "fsdp": ((8,), ("fsdp",), ("fsdp",), P("fsdp")),
    "tp": ((8,), ("tp",), (), P()),
    "fsdp_tp": ((4, 2), ("fsdp", "tp"), ("fsdp",), P("fsdp")),
}


def param_specs(mesh_name: str) -> dict:
    """FSDP shards each kernel on its larger axis (and every bias); TP is Megatron's column (up) /
    row (down) split; the 2-D mix is both."""
    if mesh_name == "dp":
        k = dict(embed=P(), eb=P(), up=P(), ub=P(), down=P(), db=P(), head=P(), hb=P())
    elif mesh_name == "fsdp":
        k = dict(embed=P(None, "fsdp"), eb=P("fsdp"), up=P(None, None, "fsdp"), ub=P(None, "fsdp"),
                 down=P(None, "fsdp", None), db=P(None, "fsdp"), head=P("fsdp", None), hb=P("fsdp"))
    elif mesh_name == "tp":
        k = dict(embed=P(), eb=P(), up=P(None, None, "tp"), ub=P(None, "tp"), down=P(None, "tp", None), db=P(),
                 head=P(), hb=P())
    else:
        k = dict(embed=P(None, "fsdp"), eb=P("fsdp"), up=P(None, "fsdp", "tp"), ub=P(None, "tp"),
                 down=P(None, "tp", "fsdp"), db=P(None, "fsdp"), head=P("fsdp", None), hb=P())
    return {"embed": {"kernel": k["embed"], "bias": k["eb"]},
            "blocks": {"up": {"kernel": k["up"], "bias": k["ub"]}, "down": {"kernel": k["down"], "bias": k["db"]}},
            "head": {"kernel": k["head"], "bias": k["hb"]}}


# Expected specs, written out by hand from the rules (A: kernel's in spec, B/m/λ_b: out spec, rank
# none, layer axis kept; an FSDP axis not yet used goes to the largest non-rank axis it divides; NF4
# blocks over (out axes, in axes); shared VeRA projections like the kernels of full in/out size).
TP2 = ("tp", "fsdp")
EXPECT = {
    "dp": {
        "up": dict(a=P(None, None, None), b=P(None, None, None), m=P(None, None), nf4=P(None, None), cache=P(None, None)),
        "down": dict(a=P(None, None, None), b=P(None, None, None), m=P(None, None), nf4=P(None, None),
                     cache=P(None, None)),
        "vera_a": P(None, None), "vera_b": P(None, None),
    },
    "fsdp": {
        "up": dict(a=P(None, "fsdp", None), b=P(None, None, "fsdp"), m=P(None, "fsdp"), nf4=P(None, "fsdp"),
                   cache=P(None, "fsdp")),
        "down": dict(a=P(None, "fsdp", None), b=P(None, None, "fsdp"), m=P(None, "fsdp"), nf4=P(None, "fsdp"),
                     cache=P(None, "fsdp")),
        "vera_a": P(None, "fsdp"), "vera_b": P("fsdp", None),
    },
    "tp": {
        "up": dict(a=P(None, None, None), b=P(None, None, "tp"), m=P(None, "tp"), nf4=P(None, "tp"),
                   cache=P(None, "tp")),
        "down": dict(a=P(None, "tp", None), b=P(None, None, None), m=P(None, None), nf4=P(None, "tp"),
                     cache=P(None, None)),
        "vera_a": P(None, "tp"), "vera_b": P("tp", None),
    },
    "fsdp_tp": {
        "up": dict(a=P(None, "fsdp", None), b=P(None, None, TP2), m=P(None, TP2), nf4=P(None, TP2), cache=P(None, TP2)),
        "down": dict(a=P(None, TP2, None), b=P(None, None, "fsdp"), m=P(None, "fsdp"), nf4=P(None, ("fsdp", "tp")),
                     cache=P(None, "fsdp")),
        "vera_a": P(None, TP2), "vera_b": P(TP2, None),
    },
}


def norm(spec, ndim):
    """A spec padded with ``None`` to ``ndim`` entries, 1-tuples unwrapped (for comparisons)."""
    e = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    return tuple(x[0] if isinstance(x, tuple) and len(x) == 1 else x for x in e)


def check_spec(where, arr, want):
    got = arr.sharding.spec
    assert isinstance(arr.sharding, NamedSharding), (where, arr.sharding)
    assert norm(got, arr.ndim) == norm(want, arr.ndim), f"{where}: sharding {got}, expected {want}"


def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return [(jax.tree_util.keystr(k), v) for k, v in leaves]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)) if b.size else 0.0


def loss_fn(run, batch):
    return optax.softmax_cross_entropy_with_integer_labels(run(batch["x"]), batch["y"]).mean()


def tx():
    # Adam's first update is lr·g/(|g| + eps) per entry: with eps=1e-8 an entry whose gradient is at the
    # float-noise level of a different reduction order flips sign; eps=1e-3 bounds that amplification.
    return optax.adam(1e-2, eps=1e-3)


def setup():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (16, 4, FEAT))
    y = jax.random.randint(jax.random.key(1), (16,), 0, CLASSES)
    variables = model.init(jax.random.key(2), x)
    layouts = lj.discover(model, variables, x)
    return model, variables["params"], layouts, {"x": x, "y": y}


def make_mesh(mesh_name):
    shape, names, _, _ = MESHES[mesh_name]
    return Mesh(np.array(jax.devices()).reshape(shape), names)


# ------------------------------------------------------------------------------------ checks

def check_frozen_specs(mesh_name, method_name, frozen, pspecs):
    exp = EXPECT[mesh_name]
    for path, spec in flat(pspecs):
        node = frozen
        for k in re.findall(r"\['([^']+)'\]", path):
            node = node[k]
        if isinstance(node, lj.nf4.NF4Array):
            kname = "up" if "'up'" in path else "down"
            want = exp[kname]["nf4"]
            check_spec(f"frozen{path}.packed", node.packed, want)
            check_spec(f"frozen{path}.absmax", node.absmax, want)
            check_spec(f"frozen{path}.nested_absmax", node.nested_absmax, want)   # 4096 blocks: 256·8 divides
            check_spec(f"frozen{path}.offset", node.offset, P(None))
        else:
            check_spec(f"frozen{path}", node, spec)
    shared = frozen.get(lj.SHARED_KEY, {})
    if method_name == "dora":
        for kname in ("up", "down"):
            check_spec(f"cache {kname}", shared["dora_base_sq_norms"][f"blocks/{kname}/kernel"], exp[kname]["cache"])
    if method_name == "vera":
        check_spec("vera A", shared["vera_0"]["a"], exp["vera_a"])
        check_spec("vera B", shared["vera_0"]["b"], exp["vera_b"])


def check_adapter_specs(mesh_name, adapter, what="adapter"):
    exp = EXPECT[mesh_name]
    for kname in ("up", "down"):
        node = adapter["blocks"][kname]["kernel"]
        for arr_name, arr in node.params.items():
            want = {"a": exp[kname]["a"], "b": exp[kname]["b"], "m": exp[kname]["m"], "lambda_b": exp[kname]["m"],
                    "lambda_d": P(None, None)}[arr_name]
            check_spec(f"{what} {kname}.{arr_name}", arr, want)


def check_opt_specs(mesh_name, opt_state):
    adam = opt_state[0]
    check_spec("opt count", adam.count, P())
    check_adapter_specs(mesh_name, adam.mu, "opt mu")
    check_adapter_specs(mesh_name, adam.nu, "opt nu")


def compare_init(sharded, ref, what):
    """Random factors bitwise; sums (norms, caches, NF4 absmax) to rounding; NF4 codes nearly all equal."""
    out = {"max_rel": 0.0, "nf4_code_diffs": 0}
    for (path, u), (_, v) in zip(flat(sharded), flat(ref)):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape and u.dtype == v.dtype, (what, path)
        if u.dtype == np.uint8:
            diff = u != v
            out["nf4_code_diffs"] += int(diff.sum())
            assert diff.mean() < 1e-3, f"{what}{path}: {int(diff.sum())} NF4 codes differ"
        else:
            e = rel_err(u, v)
            out["max_rel"] = max(out["max_rel"], e)
            assert e < 1e-6, f"{what}{path}: init differs from the one-device init by {e}"
    return out


def bytes_on(tree, device):
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards
               if s.device == device)


def bytes_total(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


_COLL = re.compile(r"= (?P<type>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\])(?:\{[^}]*\})? "
                   r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def collectives(hlo: str) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for line in hlo.splitlines():
        m = _COLL.search(line)
        if not m:
            continue
        for dt, dims in _SHAPE.findall(m.group("type")):
            out.append((m.group("op"), dt, tuple(int(d) for d in dims.split(",") if d)))
    return out


def array_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, shape)`` of every array an instruction of the (per-device) HLO program produces."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in re.findall(r"= \(?([a-z]+[0-9]*)\[([0-9,]*)\]", hlo)]


def kernel_shapes(frozen):
    """Shapes of the adapted base kernels, whole: stacked and one layer, either orientation (sorted dims),
    and for NF4 kernels their packed / absmax arrays, stacked and one layer."""
    shapes = set()
    for name in ("up", "down"):
        k = lj.base_params(frozen)["blocks"][name]["kernel"]
        if isinstance(k, lj.nf4.NF4Array):
            arrays = [k.packed, k.absmax]
            shapes.add(tuple(sorted(k.shape)))                    # one layer dequantized (out, in)
            shapes.add(tuple(sorted((LAYERS,) + k.shape)))
        else:
            arrays = [k]
        for a in arrays:
            shapes.add(tuple(sorted(a.shape)))
            shapes.add(tuple(sorted(a.shape[1:])))
    return shapes


def full_kernel_collectives(hlo, shapes):
    """All-gathers (and all-reduces: a replication can take either form) whose result is a whole adapted kernel."""
    return [c for c in collectives(hlo) if c[0] in ("all-gather", "all-reduce")
            and tuple(sorted(d for d in c[2] if d > 1)) in shapes]


# ------------------------------------------------------------------------------------ cases

def reference(model, params, layouts, batch, method_name, step=True):
    """The one-device init, the randomized adapter the steps start from, and one step from it."""
    frozen, adapter0 = lj.init(METHODS[method_name](), params, jax.random.key(3), layouts=layouts)
    adapter = randomize(adapter0, scale=0.05)
    out = {"init": (frozen, adapter0), "frozen": frozen, "adapter": adapter, "step": (None, None, None)}
    if step:
        ts = lj.train.make_train_step(model, loss_fn, tx(), donate=False)
        a1, s1, loss = ts.step(adapter, ts.init(adapter), frozen, batch)
        out["step"] = (a1, s1, float(loss))
    return out


_BASE_HLO: dict = {}


def run_case(mesh_name, method_name, model, params, layouts, batch, ref, result, step=True):
    mesh = make_mesh(mesh_name)
    _, _, fsdp, batch_spec = MESHES[mesh_name]
    pspecs = param_specs(mesh_name)
    frozen1, adapter1, (a_ref, s_ref, loss_ref) = ref["frozen"], ref["adapter"], ref["step"]
    t0, c0 = time.perf_counter(), time.process_time()
    params_s = lj.sharding.place(params, pspecs, mesh)
    with lj.sharding.fsdp_axes(*fsdp):
        frozen_s, adapter_s = lj.init(METHODS[method_name](), params_s, jax.random.key(3), layouts=layouts)
        check_frozen_specs(mesh_name, method_name, frozen_s, pspecs)
        check_adapter_specs(mesh_name, adapter_s)
        fig = compare_init((frozen_s, adapter_s), ref["init"], f"{mesh_name}/{method_name} init")
        if method_name == "qlora":   # double quantization's mean over all blocks rounds differently when sharded:
            frozen_s = lj.sharding.place_frozen(frozen1, adapter1, pspecs, mesh)   # train on the same NF4 bytes
            check_frozen_specs(mesh_name, method_name, frozen_s, pspecs)
        # the reference's randomized start, from host copies (a replicated placement may alias the
        # one-device buffers, which the step then donates)
        adapter_r = lj.sharding.place_adapter(jax.device_get(adapter1), params_s, mesh)
        check_adapter_specs(mesh_name, adapter_r)
        ts = lj.train.make_train_step(model, loss_fn, tx(), mesh=mesh)
        opt = ts.init(adapter_r)
    check_opt_specs(mesh_name, opt)
    rec = {"init": fig}
    if mesh_name == "fsdp":
        dev = jax.devices()[0]
        state = (frozen_s, adapter_r, opt)
        per_dev, total = bytes_on(state, dev), bytes_total(state)
        rec["bytes_per_device"], rec["bytes_total"] = per_dev, total
        rec["bytes_ratio"] = per_dev / (total / 8)
        assert rec["bytes_ratio"] < 1.10, f"fsdp/{method_name}: per-device bytes {per_dev} are {rec['bytes_ratio']:.3f}" \
                                          " × 1/8 of the total"
        # for comparison: the kernel-derived rule alone (no fsdp_axes): factors of the kernel's unsharded side whole
        a_k = lj.sharding.place_adapter(jax.device_get(adapter1), params_s, mesh)
        state_k = (lj.sharding.place_frozen(frozen1, adapter1, pspecs, mesh), a_k,
                   lj.sharding.placed_opt_init(tx().init, mesh)(a_k))
        rec["bytes_ratio_without_fsdp_axes"] = bytes_on(state_k, dev) / (bytes_total(state_k) / 8)
    if not step:
        rec["cpu_seconds"] = round(time.process_time() - c0, 1)
        result.setdefault(mesh_name + ":bytes", {})[method_name] = rec
        return
    batch_s = jax.device_put(batch, {"x": NamedSharding(mesh, batch_spec), "y": NamedSharding(mesh, batch_spec)})
    a_in = jax.tree_util.tree_leaves((adapter_r, opt))
    if mesh_name == "fsdp_tp" or (mesh_name == "tp" and method_name in ("lora", "dora")):
        compiled = ts.step.lower(adapter_r, opt, frozen_s, batch_s).compile()   # run what is inspected
        hlo = compiled.as_text()
        if mesh_name == "tp":
            result.setdefault("tp_collectives", {})[method_name] = collectives(hlo)
        a2, s2, loss = compiled(adapter_r, opt, frozen_s, batch_s, None)
    else:
        a2, s2, loss = ts.step(adapter_r, opt, frozen_s, batch_s)
    assert all(x.is_deleted() for x in a_in if isinstance(x, jax.Array) and x.size > 1), "adapter/opt not donated"
    loss = float(loss)
    errs = {"loss": abs(loss - loss_ref) / abs(loss_ref)}
    for (path, u), (_, v) in zip(flat((a2, s2)), flat((a_ref, s_ref))):
        errs[path] = rel_err(u, v)
    worst = max(errs, key=errs.get)
    assert errs[worst] < TOL, f"{mesh_name}/{method_name}: {worst} differs from the one-device step by {errs[worst]}"
    check_adapter_specs(mesh_name, a2, "stepped adapter")
    check_opt_specs(mesh_name, s2)
    # merge under jit: base shardings kept
    merged = jax.jit(lj.merge)(frozen_s, a2)
    for (path, u), (_, spec) in zip(flat(merged), flat(pspecs)):
        if not (method_name == "qlora" and re.search(r"'(up|down)'\]\['kernel", path)):
            check_spec(f"merged{path}", u, spec)
    rec.update(loss_rel=errs["loss"], max_rel=errs[worst])
    if method_name == "qlora":
        rec["merged_nf4_kernel_specs"] = [str(merged["blocks"][k]["kernel"].sharding.spec) for k in ("up", "down")]
    if mesh_name == "fsdp_tp":
        shapes = kernel_shapes(frozen_s)
        # lj.init's program (the one init_placed compiles): no whole adapted kernel on any device
        fn = lambda p, k: lj.init(METHODS[method_name](), p, k, layouts=layouts)  # noqa: E731
        with lj.sharding.fsdp_axes(*fsdp):
            f_abs, a_abs = jax.eval_shape(fn, params_s, jax.random.key(3))
            out_sh = (lj.sharding.named(mesh, lj.sharding.frozen_specs(f_abs, a_abs, params_s, mesh)),
                      lj.sharding.named(mesh, lj.sharding.adapter_specs(a_abs, params_s, mesh)))
        init_c = jax.jit(fn, out_shardings=out_sh).lower(params_s, jax.random.key(3)).compile()
        init_hlo = init_c.as_text()
        biggest = max((int(np.prod(shape)), f"{dt}{list(shape)}") for dt, shape in array_shapes(init_hlo))
        rec["init_program"] = {"full_kernel_collectives": len(full_kernel_collectives(init_hlo, shapes)),
                               "largest_array_per_device": biggest[1],
                               "temp_bytes_per_device": init_c.memory_analysis().temp_size_in_bytes}
        assert rec["init_program"]["full_kernel_collectives"] == 0, rec["init_program"]
        assert biggest[0] * 2 <= D * HID, f"{method_name}: init holds {biggest[1]} on one device"   # ≤ half a layer
        adapted = full_kernel_collectives(hlo, shapes)
        quantized = method_name == "qlora"
        if quantized not in _BASE_HLO:      # the base model alone (fp32 or NF4): forward + backward to its input
            base = lj.base_params(frozen_s)

            def base_loss(x):
                return loss_fn(lambda xx: lj.apply(model, {"params": base}, {}, xx), {"x": x, "y": batch_s["y"]})
            _BASE_HLO[quantized] = jax.jit(jax.grad(base_loss)).lower(batch_s["x"]).compile().as_text()
        base_g = full_kernel_collectives(_BASE_HLO[quantized], shapes)
        rec["full_kernel_collectives"] = {"adapted_step": len(adapted), "base_model": len(base_g)}
        rec["all_gathers"] = sorted({f"{c[1]}{list(c[2])}" for c in collectives(hlo) if c[0] == "all-gather"})
        assert len(adapted) <= len(base_g), f"{method_name}: the step all-gathers full kernels {adapted}; the base " \
                                            f"model {base_g}"
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["cpu_seconds"] = round(time.process_time() - c0, 1)
    result.setdefault(mesh_name, {})[method_name] = rec


def run_extra(result):
    """Flax logical metadata, NNX sharding annotations, lj.quantize on placed params, NF4 fallback."""
    from flax import nnx
    mesh = make_mesh("fsdp_tp")
    rules = [("embed", "fsdp"), ("mlp", "tp")]

    class Logical(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.lecun_normal()
            h = nn.Dense(HID, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")), name="up")(x)
            return nn.Dense(D, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")), name="down")(h)

    model = Logical()
    x = jnp.ones((8, D))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    specs = lj.sharding.specs_of(abstract, rules=rules)
    assert specs["up"]["kernel"] == P("fsdp", "tp") and specs["down"]["kernel"] == P("tp", "fsdp"), specs
    params = jax.jit(lambda k: nn.unbox(model.init(k, x)["params"]),
                     out_shardings=lj.sharding.named(mesh, specs))(jax.random.key(0))
    frozen, adapter = lj.init(lj.DoRA(rank=4, targets=".*kernel"), params, jax.random.key(1))
    check_spec("logical up.a", adapter["up"]["kernel"]["a"], P("fsdp", None))
    check_spec("logical up.b", adapter["up"]["kernel"]["b"], P(None, "tp"))
    check_spec("logical down.m", adapter["down"]["kernel"]["m"], P("fsdp"))
    # the same from the explicit spec tree, without placed params
    unplaced = nn.unbox(model.init(jax.random.key(0), x)["params"])
    f2, a2 = lj.init(lj.DoRA(rank=4, targets=".*kernel"), unplaced, jax.random.key(1))
    a2 = lj.sharding.place_adapter(a2, specs, mesh)
    for (p_, u), (_, v) in zip(flat(adapter), flat(a2)):
        assert u.sharding == v.sharding, p_
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, err_msg=p_)

    class Lin(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(D, HID, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
            self.down = nnx.Linear(HID, D, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        nmodel = Lin(nnx.Rngs(0))
        nspecs = lj.sharding.specs_of(nmodel)
    assert nspecs["up"]["kernel"] == P("fsdp", "tp"), nspecs
    from lowrank_jax.execution import nnx as lnx
    nparams = lnx.params_of(nmodel)
    check_spec("nnx up kernel", nparams["up"]["kernel"], P("fsdp", "tp"))
    _, nadapter = lj.init(lj.LoRA(rank=4, targets=".*kernel"), nparams, jax.random.key(1))
    check_spec("nnx up.a", nadapter["up"]["kernel"]["a"], P("fsdp", None))
    check_spec("nnx down.b", nadapter["down"]["kernel"]["b"], P(None, "fsdp"))

    # lj.quantize on placed params: NF4 leaves along their blocks, same bytes as on one device
    q_s = lj.quantize(params, lj.NF4(block_size=64, double_quant=False))
    q_1 = lj.quantize(unplaced, lj.NF4(block_size=64, double_quant=False))
    check_spec("quantize up.packed", q_s["up"]["kernel"].packed, P(TP2))
    check_spec("quantize down.absmax", q_s["down"]["kernel"].absmax, P(("fsdp", "tp")))
    for (p_, u), (_, v) in zip(flat(q_s), flat(q_1)):
        assert np.array_equal(np.asarray(u), np.asarray(v)), f"quantize{p_} differs from the one-device bytes"
    # block boundaries that do not line up: the blocks fall back (with the reason) to fewer mesh axes
    odd = lj.sharding.place({"k": {"kernel": np.ones((48, 24), np.float32)}}, {"k": {"kernel": P("fsdp", "tp")}}, mesh)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q_odd = lj.quantize(odd, lj.NF4(block_size=64, double_quant=False))
    msgs = [str(x.message) for x in w if issubclass(x.category, lj.sharding.FallbackWarning)]
    assert msgs and "k/kernel" in msgs[0], msgs
    result["extra"] = {"fallback_warning": msgs[0], "odd_spec": str(q_odd["k"]["kernel"].packed.sharding.spec)}


def parse(args: list[str]) -> list[tuple[str, bool, list[str]]]:
    """``MESH[:bytes][=METHOD+METHOD...]`` → ``(mesh, with_step, methods)`` (all methods by default)."""
    cases = []
    for arg in args:
        head, _, methods = arg.partition("=")
        name, _, only = head.partition(":")
        cases.append((name, only != "bytes", methods.split("+") if methods else list(METHODS)))
    return cases


def main():
    cases = parse(sys.argv[1:])
    assert len(jax.devices()) == 8, jax.devices()
    result: dict = {}
    model, params, layouts, batch = setup()
    if any(name == "extra" for name, _, _ in cases):
        c0 = time.process_time()
        run_extra(result)
        result["extra"]["cpu_seconds"] = round(time.process_time() - c0, 1)
        cases = [c for c in cases if c[0] != "extra"]
    for method_name in METHODS:
        mine = [(name, step) for name, step, methods in cases if method_name in methods]
        if not mine:
            continue
        c0 = time.process_time()
        ref = reference(model, params, layouts, batch, method_name, step=any(step for _, step in mine))
        result.setdefault("reference_cpu_seconds", {})[method_name] = round(time.process_time() - c0, 1)
        for name, step in mine:
            run_case(name, method_name, model, params, layouts, batch, ref, result, step=step)
    if "tp_collectives" in result and len(result["tp_collectives"]) == 2:
        lora = collections.Counter(map(tuple, result["tp_collectives"]["lora"]))
        dora = collections.Counter(map(tuple, result["tp_collectives"]["dora"]))
        result["dora_extra_collectives_tp"] = sorted(f"{op} {dt}{list(s)} x{n}" for (op, dt, s), n in (dora - lora).items())
        result["tp_collectives"] = {k: sorted(f"{op} {dt}{list(s)}" for op, dt, s in v)
                                    for k, v in result["tp_collectives"].items()}
    result["cpu_seconds_total"] = round(time.process_time(), 1)
    print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
