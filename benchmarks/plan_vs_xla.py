"""``lowrank-jax plan`` against the compiler: XLA's ``memory_analysis`` of the real train step, abstractly.

For each case (model config x method x devices) this builds the real training step of the Llama-style
reference model (:class:`lowrank_jax.models.llama.LlamaForCausalLM`, causal-LM cross-entropy, optax Adam)
with **abstract** parameters -- ``jax.ShapeDtypeStruct`` everywhere, ``model.init`` / ``lj.init`` traced with
``jax.eval_shape``, so nothing is allocated -- lowers and compiles it with
``jax.jit(step).lower(*abstract_args).compile()`` and reads ``memory_analysis()``:

* ``full``: ``value_and_grad`` over all params + ``optax.adam`` + ``apply_updates``; params and optimizer
  state donated (what a user writes for full fine-tuning).
* ``lora`` / ``qlora``: ``lj.train.make_train_step`` (the library's jitted step: factored execution,
  adapter and optimizer state donated) with ``LoRA(rank, targets=every q/k/v/o/gate/up/down kernel)``;
  QLoRA is the same with ``quant=lj.NF4()`` (those kernels stored as NF4 + double quant; embeddings,
  norms and the LM head stay in ``--dtype``). If the library has ``lj.quantize`` (whole-base NF4), a
  ``qlora_all`` method quantizes the base with it first.

Devices: ``1`` compiles in this process; ``8`` re-runs this script in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and an FSDP layout: a 1-D mesh ``("fsdp",)``, every
parameter / adapter / optimizer-state array sharded along its largest axis divisible by the device count
(replicated if none), the batch sharded along its batch axis with ``--batch`` sequences *per device*
(global batch = devices x batch), and every module's output kept batch-sharded (:func:`batch_constraints`),
so each device runs its own sequences with gathered weights. XLA reports per-device sizes.

For every case it prints the plan (:func:`lowrank_jax.plan.plan`, backend ``cpu``) against XLA
(arguments + temporaries) and their ratio, and writes a JSON under ``benchmarks/results/``. ``--live``
also records XLA's peak live bytes (from its live-range dump), which ``arguments + temporaries`` exceeds
when the heap packing leaves gaps; ``--frozen-dot`` builds the adapter steps with the prototype of the
proposed frozen-product fix (``diag_plan_temps.py``); ``--replot FILE`` re-tables a saved run.

    python benchmarks/plan_vs_xla.py --live        # 1b, 8b x full, lora, qlora, qlora_all x 1, 8 devices (~6 min)
    python benchmarks/plan_vs_xla.py --configs 1b --methods lora --devices 1 --layers 4   # quick look
    python benchmarks/plan_vs_xla.py --configs 1b --dtype bfloat16 --methods full,lora,qlora
    python benchmarks/plan_vs_xla.py --configs smollm2,minilm --devices 1

Memory only: nothing is executed and no weights are materialised, so an 8B (or 70B) step compiles on a
laptop; compile time is the cost (10-35 s per case on 2 cores for 1B and 8B).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

FLAG_DEVICES = "--xla_force_host_platform_device_count"
_MARK = "@@PLAN_VS_XLA_JSON@@"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
GiB = float(2 ** 30)
LLAMA_TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
BERT_TARGETS = r".*/(query|key|value|dense)/kernel"


# --------------------------------------------------------------------------------------- model

def build_model(config: str, dtype: str, layers: int | None, remat: str) -> tuple[Any, Any, str]:
    """``(model, example_ids_fn, kind)`` for a plan config name, shapes from :mod:`lowrank_jax.plan`."""
    import jax.numpy as jnp

    from lowrank_jax import plan as lp

    spec = lp.model_spec(config)
    if spec.family == "bert":
        from lowrank_jax.models.bert import BertClassifier, BertConfig
        cfg = BertConfig(num_hidden_layers=layers or spec.n_layers, dtype=jnp.dtype(dtype),
                         param_dtype=jnp.dtype(dtype))
        if remat != "none":
            raise SystemExit("--remat is only wired for the Llama configs")
        return BertClassifier(cfg, num_labels=2), cfg, "bert"
    from lowrank_jax.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=layers or spec.n_layers, num_attention_heads=spec.n_heads,
                      num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                      tie_word_embeddings=spec.tied_embeddings, dtype=jnp.dtype(dtype),
                      param_dtype=jnp.dtype(dtype))
    return _llama(cfg, remat), cfg, "llama"


def _llama(cfg: Any, remat: str) -> Any:
    """The reference ``LlamaForCausalLM``; with ``remat != "none"`` each decoder layer under ``nn.remat``.

    The remat variant repeats ``LlamaModel.__call__`` / ``LlamaForCausalLM.__call__`` with the decoder
    layer class wrapped, so parameter paths are identical (``model/layers_{i}/...``). Policies:
    ``full`` = ``nothing_saveable``; ``linear_outputs`` = ``dots_with_no_batch_dims_saveable`` (saves
    the outputs of the projections -- and of the adapter's thin matmuls -- not the attention einsums).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lowrank_jax.models import llama as L

    if remat == "none":
        return L.LlamaForCausalLM(cfg)
    policy = {"full": jax.checkpoint_policies.nothing_saveable,
              "linear_outputs": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[remat]
    Layer = nn.remat(L.LlamaDecoderLayer, policy=policy, prevent_cse=True)

    class RematLlamaModel(nn.Module):
        config: Any

        @nn.compact
        def __call__(self, input_ids):
            c = self.config
            b, t = input_ids.shape
            embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                             name="embed_tokens")
            pos = jnp.broadcast_to(jnp.arange(t), (b, t))
            cos, sin = L.rope_cos_sin(pos, c.head_dim, c.rope_theta)
            mask = L.causal_mask_bias(None, b, t)
            x = embed(input_ids)
            for i in range(c.num_hidden_layers):
                x = Layer(c, name=f"layers_{i}")(x, cos, sin, mask)
            return L._rms_norm(c, "norm")(x)

    class RematLlamaForCausalLM(nn.Module):
        config: Any

        @nn.compact
        def __call__(self, input_ids):
            c = self.config
            hidden = RematLlamaModel(c, name="model")(input_ids)
            if c.tie_word_embeddings:
                table = self.variables["params"]["model"]["embed_tokens"]["embedding"]
                logits = jnp.einsum("btd,vd->btv", hidden.astype(c.dtype), table.astype(c.dtype))
            else:
                logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                                  name="lm_head")(hidden)
            return logits.astype(jnp.float32)

    return RematLlamaForCausalLM(cfg)


# --------------------------------------------------------------------------------------- sharding

def fsdp_sharding(mesh: Any, shape: tuple[int, ...]) -> Any:
    """``NamedSharding`` splitting the largest axis divisible by the mesh size (replicated if none)."""
    from jax.sharding import NamedSharding, PartitionSpec

    n = mesh.devices.size
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for ax in order:
        if shape[ax] % n == 0 and shape[ax] >= n:
            spec = [None] * len(shape)
            spec[ax] = "fsdp"
            return NamedSharding(mesh, PartitionSpec(*spec))
    return NamedSharding(mesh, PartitionSpec())


def batch_constraints(mesh: Any, global_batch: int) -> Any:
    """A flax interceptor keeping every module's batch-leading outputs sharded along the batch (FSDP).

    Without it XLA's SPMD partitioner may prefer to all-gather *activations* (tensor-parallel style: the
    projections' inputs over all devices' tokens, kept for the weight gradients) when they are smaller
    than the weights; with it each device computes its own sequences with the layer's weights gathered,
    which is what FSDP means.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def constrain(x):
        if hasattr(x, "shape") and len(x.shape) >= 2 and x.shape[0] == global_batch:
            spec = PartitionSpec("fsdp", *([None] * (len(x.shape) - 1)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x

    def interceptor(next_fun, args, kwargs, context):
        return jax.tree_util.tree_map(constrain, next_fun(*args, **kwargs))

    return interceptor


def with_shardings(tree: Any, mesh: Any | None, batch_axis: bool = False) -> Any:
    """Abstract leaves of ``tree`` with FSDP shardings attached (``mesh=None``: unchanged)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if mesh is None:
        return tree

    def one(x):
        if batch_axis:
            sh = NamedSharding(mesh, PartitionSpec("fsdp", *([None] * (len(x.shape) - 1))))
        else:
            sh = fsdp_sharding(mesh, tuple(x.shape))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------------------------- one case

def compile_case(config: str, method: str, *, dtype: str = "float32", rank: int = 16, batch: int = 1,
                 seq: int = 512, layers: int | None = None, remat: str = "none",
                 donate: bool = True, factored: bool = True, frozen_dot: bool = False,
                 dump_dir: str | None = None, live_peak: bool = False) -> dict[str, Any]:
    """Compile one abstract train step on every visible device (FSDP when more than one); sizes in bytes.

    ``factored=False`` builds the adapter step on merged weights (``make_train_step(factored=False)``);
    ``frozen_dot=True`` swaps in the prototype of the proposed execution-path fix
    (``diag_plan_temps.frozen_dot_dense``). ``dump_dir`` makes XLA write the optimized HLO, buffer
    assignment and live ranges there; ``live_peak=True`` also records ``peak_live_bytes``, the most bytes
    (arguments included) alive at once in XLA's own live-range analysis -- ``arguments + temps`` exceeds it
    when the heap packing leaves gaps.
    """
    if frozen_dot:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from diag_plan_temps import frozen_dot_dense
        with frozen_dot_dense():
            r = compile_case(config, method, dtype=dtype, rank=rank, batch=batch, seq=seq, layers=layers,
                             remat=remat, donate=donate, factored=factored, dump_dir=dump_dir,
                             live_peak=live_peak)
        return {**r, "frozen_dot": True}
    import shutil
    import tempfile
    tmp = None
    if live_peak and dump_dir is None:
        dump_dir = tmp = tempfile.mkdtemp(prefix="plan_vs_xla_")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lowrank_jax as lj

    devices = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",)) if devices > 1 else None
    model, cfg, kind = build_model(config, dtype, layers, remat)
    ids = jax.ShapeDtypeStruct((batch * devices, seq), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    tx = optax.adam(1e-4)

    def loss_fn(run, ids):
        logits = run(ids)
        if kind == "bert":   # sequence classification: label = first token parity (shape only)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 0] % 2).mean()
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    t0 = time.perf_counter()
    if method == "full":
        def step(p, o, ids):
            loss, g = jax.value_and_grad(lambda p: loss_fn(lambda x: model.apply({"params": p}, x), ids))(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        opt = jax.eval_shape(tx.init, params)
        args = (with_shardings(params, mesh), with_shardings(opt, mesh), with_shardings(ids, mesh, True))
        fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    else:
        targets = BERT_TARGETS if kind == "bert" else LLAMA_TARGETS
        if method in ("lora", "qlora"):
            quant = lj.NF4() if method == "qlora" else None
            m = lj.LoRA(rank=rank, alpha=2.0 * rank, targets=targets, quant=quant)
            frozen, adapter = jax.eval_shape(lambda p: lj.init(m, p, jax.random.key(0)), params)
        elif method == "qlora_all":
            if not hasattr(lj, "quantize"):
                raise RuntimeError("qlora_all needs lj.quantize (whole-base NF4), which this library lacks")
            m = lj.LoRA(rank=rank, alpha=2.0 * rank, targets=targets)
            frozen, adapter = jax.eval_shape(
                lambda p: lj.init(m, lj.quantize(p, lj.NF4()), jax.random.key(0)), params)
        else:
            raise ValueError(f"unknown method {method!r}")
        ts = lj.train.make_train_step(model, loss_fn, tx, donate=donate, factored=factored)
        opt = jax.eval_shape(ts.init, adapter)
        args = (with_shardings(adapter, mesh), with_shardings(opt, mesh), with_shardings(frozen, mesh),
                with_shardings(ids, mesh, True))
        fn = ts.step
    import contextlib

    import flax.linen as nn
    ctx = nn.intercept_methods(batch_constraints(mesh, batch * devices)) if mesh is not None \
        else contextlib.nullcontext()
    with ctx:
        lowered = fn.lower(*args)
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True,
               "xla_dump_hlo_pass_re": "NONE"} if dump_dir else None
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    peak_live = None
    if live_peak:
        import glob
        import re
        lr = glob.glob(os.path.join(dump_dir, "*live-range.txt"))
        m = re.search(r"peak usage: ([\d ]+) bytes", open(lr[-1]).read()) if lr else None
        peak_live = int(m.group(1).replace(" ", "")) if m else None
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "config": config, "method": method, "devices": devices, "dtype": dtype, "rank": rank,
        "batch": batch, "seq": seq, "layers": layers or cfg.num_hidden_layers, "remat": remat,
        "donate": donate, "factored": factored, "frozen_dot": False, "peak_live_bytes": peak_live,
        "argument_bytes": int(ma.argument_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes),
        "compile_s": round(seconds, 2),
    }


def xla_total(r: dict[str, Any]) -> int:
    """Peak the step needs on a device: arguments + temporaries + outputs that do not alias an argument."""
    return r["argument_bytes"] + r["temp_bytes"] + max(0, r["output_bytes"] - r["alias_bytes"])


def plan_for(r: dict[str, Any]) -> Any:
    from lowrank_jax import plan as lp

    method = {"qlora_all": "qlora"}.get(r["method"], r["method"])
    spec = lp.model_spec(r["config"])
    if r["layers"] != spec.n_layers:
        spec = lp.with_layers(spec, r["layers"])
    return lp.plan(spec, methods=(method,), dtype=r["dtype"], optimizer="adam", rank=r["rank"],
                   batch=r["batch"], seq=r["seq"], remat=r["remat"], devices=r["devices"],
                   backend="cpu", nf4_head=r["method"] == "qlora_all",
                   frozen_dot_fix=bool(r.get("frozen_dot")))[0]


# --------------------------------------------------------------------------------------- driver

def _run_worker(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in cases:
        try:
            r = compile_case(**c)
        except Exception as e:  # keep going: one failing case should not hide the others
            r = {**c, "error": f"{type(e).__name__}: {e}"}
        print(f"  compiled {c['config']}/{c['method']}: "
              + (r.get("error") or f"args {r['argument_bytes'] / GiB:.2f} GiB, temps "
                 f"{r['temp_bytes'] / GiB:.2f} GiB ({r['compile_s']:.0f} s)"), file=sys.stderr, flush=True)
        out.append(r)
    return out


def _spawn(devices: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" {FLAG_DEVICES}={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cases)],
                          env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"worker for {devices} devices failed (exit {proc.returncode})")


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: XLA's per-device arguments, temporaries, total, the plan and the ratio (GiB)."""
    rows = ["| config | method | dtype | devices | XLA args | XLA temps | XLA total | plan | plan / XLA |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tag = r["method"] + (" (frozen_dot)" if r.get("frozen_dot") else "") + \
            (f" remat={r['remat']}" if r.get("remat", "none") != "none" else "")
        if "error" in r:
            rows.append(f"| {r['config']} | {tag} | {r.get('dtype')} | {r.get('devices', '?')} | "
                        f"error: {r['error']} | | | | |")
            continue
        p = plan_for(r)
        r["xla_total_bytes"] = xla_total(r)
        r["plan"] = p.as_dict()
        r["ratio"] = p.total / r["xla_total_bytes"]
        rows.append(f"| {r['config']} | {tag} | {r['dtype']} | {r['devices']} | {r['argument_bytes'] / GiB:.2f} | "
                    f"{r['temp_bytes'] / GiB:.2f} | {r['xla_total_bytes'] / GiB:.2f} | {p.total / GiB:.2f} | "
                    f"{r['ratio']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1b,8b", help="comma list of plan configs (1b,8b,70b,smollm2,minilm)")
    ap.add_argument("--methods", default="full,lora,qlora,qlora_all",
                    help="comma list of full,lora,qlora,qlora_all (qlora_all: lj.quantize, LM head in NF4 too)")
    ap.add_argument("--devices", default="1,8", help="comma list of device counts (>1: FSDP subprocess)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="sequences per device")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--remat", choices=("none", "full", "linear_outputs"), default="none")
    ap.add_argument("--no-donate", action="store_true")
    ap.add_argument("--frozen-dot", action="store_true",
                    help="adapter steps with the prototype of the proposed frozen-product fix")
    ap.add_argument("--live", action="store_true",
                    help="also record XLA's peak live bytes (dumps the compiled program to a temp dir)")
    ap.add_argument("--replot", default=None,
                    help="re-table a results JSON with the current plan, no compile (--json: write it back)")
    ap.add_argument("--json", default=None, help="output JSON (default benchmarks/results/plan_vs_xla_<time>.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        import lowrank_jax  # noqa: F401  (installed, or on PYTHONPATH)
    except ImportError:
        sys.path.insert(0, ROOT)

    if args.worker is not None:
        print(_MARK + json.dumps(_run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.replot:
        with open(args.replot) as f:
            data = json.load(f)
        print(table(data["results"]))       # refreshes each result's "plan" and "ratio"
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    import lowrank_jax as lj
    if "qlora_all" in methods and not hasattr(lj, "quantize"):
        print("note: lj.quantize (whole-base NF4) is not in this library; 'qlora_all' rows are skipped",
              file=sys.stderr)
        methods = [m for m in methods if m != "qlora_all"]
    results: list[dict[str, Any]] = []
    for dev in [int(d) for d in args.devices.split(",")]:
        cases = [dict(config=c, method=m, dtype=args.dtype, rank=args.rank, batch=args.batch, seq=args.seq,
                      layers=args.layers, remat=args.remat, donate=not args.no_donate,
                      frozen_dot=args.frozen_dot and m != "full", live_peak=args.live)
                 for c in configs for m in methods]
        print(f"compiling {len(cases)} case(s) on {dev} device(s) ...", file=sys.stderr, flush=True)
        results += _run_worker(cases) if dev == 1 else _spawn(dev, cases)

    print(f"\nplan (backend cpu) vs XLA memory_analysis, per device, GiB (batch {args.batch} x {args.seq} per "
          f"device, Adam, r={args.rank}; XLA total = arguments + temporaries + non-aliased outputs)")
    print(table(results))
    if args.live:
        print("\nXLA peak live bytes (arguments included) vs arguments + temporaries:")
        for r in results:
            if r.get("peak_live_bytes"):
                print(f"  {r['config']} {r['method']} x{r['devices']}: live {r['peak_live_bytes'] / GiB:.2f} GiB, "
                      f"args+temps {(r['argument_bytes'] + r['temp_bytes']) / GiB:.2f} GiB, plan / live "
                      f"{r['plan']['total'] / r['peak_live_bytes']:.3f}")
    import jax
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "library": rev, "argv": sys.argv[1:]}
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"plan_vs_xla_{datetime.datetime.now():%Y%m%d_%H%M%S}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
